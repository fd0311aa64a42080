"""The evaluation page at scale: 2,000 synthetic questions, three methods, a figure each, in headless Chromium.

    python bench/bench_report_page.py                  # 2,000 questions (needs chromium + chromium-driver)
    python bench/bench_report_page.py --questions 500

Prints one summary: the time to write the page, its size (and whether the figures were embedded), the time to
first paint of the page opened from disk (the browser's own paint entry), and the time one filter takes
(wrong only, then a text search on top of it: the handler and the layout it causes). Not a test: it times, it asserts
nothing beyond the page having the right row count.
"""
import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import evaluation_page  # noqa: E402
import inference_example as inference  # noqa: E402
from test_report_page import chromium_driver, scores  # noqa: E402

FILTER_MS = """
const started = performance.now();
const control = document.getElementById(arguments[0]);
if (control.type === 'checkbox') { control.checked = !control.checked; } else { control.value = arguments[1]; }
control.dispatchEvent(new Event(control.type === 'search' ? 'input' : 'change'));
document.body.offsetHeight;  // the layout the filter causes, not only the handler
return [performance.now() - started, document.getElementById('shown').textContent];
"""


def synthetic_report(folder, n, seed=0):
    """n questions with a figure each; fine_tuned/score right on ~75%, base/score on ~30%, generate with a
    reasoning of a few sentences."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images, processed = folder / "images", folder / "processed"
    images.mkdir(parents=True)
    processed.mkdir()
    (processed / "dataset_dict.json").write_text("{}")
    (processed / "preprocessing_stats.json").write_text(f'{{"config": {{"image_root": "{images}"}}}}')
    records = {"fine_tuned/score": [], "base/score": [], "fine_tuned/generate": []}
    for i in range(n):
        image = Image.new("RGB", (480, 360), (rng.randrange(40), rng.randrange(40), rng.randrange(60)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y, r = rng.randrange(480), rng.randrange(360), rng.randrange(10, 60)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(images / f"PMC{i}_F1.jpg", quality=90)
        gold = rng.choice("ABCD")
        question = {"id": f"q{i}", "question": f"Which finding does figure {i} show (synthetic question)?",
                    "options": ["Liver cyst", "Splenic infarct", "Renal stone", "Lung nodule"],
                    "figure_path": f"PMC{i}_F1.jpg", "gold": gold}
        for name, right in (("fine_tuned/score", 0.75), ("base/score", 0.3), ("fine_tuned/generate", 0.7)):
            predicted = gold if rng.random() < right else rng.choice("ABCD")
            answer = {"option_scores": scores(predicted, rng.uniform(0.3, 0.99)), "samples": None}
            if name.endswith("generate"):
                text = " ".join(["The figure shows a rounded opacity with smooth margins."] * 4)
                answer = {"option_scores": None, "samples": [{"text": f"{text}\n</think>\n\nAnswer: {predicted}",
                                                               "predicted": predicted, "status": "answered",
                                                               "tokens": 80, "finished": True}]}
            records[name].append({**question, "predicted": predicted, "correct": predicted == gold, **answer})
    results = {name: {**inference.summarize(rows, seconds=10.0), "records": rows} for name, rows in records.items()}
    return {"model_name_or_path": "synthetic", "adapter_path": None, "data_path": str(processed), "split": "test",
            "reads_images": True, "results": results,
            "paired": {"fine_tuned/score - base/score": inference.paired_comparison(results["fine_tuned/score"],
                                                                                   results["base/score"])}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2000, help="synthetic questions (default: %(default)s)")
    args = parser.parse_args()
    driver = chromium_driver()
    if driver is None:
        sys.exit("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and "
                 "selenium (requirements.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        report = synthetic_report(Path(tmp), args.questions)
        started = time.time()
        page = evaluation_page.write_page(report, Path(tmp) / "evaluation_report.html")
        written = time.time() - started
        size = page.stat().st_size + sum(f.stat().st_size for f in page.parent.glob(f"{page.stem}_figures/*"))
        embedded = not (page.parent / f"{page.stem}_figures").exists()
        try:
            driver.get(page.as_uri())
            paint = driver.execute_script(
                "return performance.getEntriesByType('paint').map(e => [e.name, e.startTime])")
            cards = driver.execute_script("return document.querySelectorAll('article.card').length")
            wrong_ms, wrong_shown = driver.execute_script(FILTER_MS, "f-wrong")
            search_ms, search_shown = driver.execute_script(FILTER_MS, "f-search", "figure 1")
        finally:
            driver.quit()
    assert cards == args.questions, cards
    paints = dict(paint)
    print(f"{args.questions} questions x 3 methods: page written in {written:.1f} s, "
          f"{size / 1e6:.1f} MB ({'figures embedded' if embedded else 'figures in a folder beside it'}); "
          f"first paint {paints.get('first-paint', float('nan')):.0f} ms, first contentful paint "
          f"{paints.get('first-contentful-paint', float('nan')):.0f} ms; filter 'wrong only' {wrong_ms:.0f} ms "
          f"({wrong_shown}), search {search_ms:.0f} ms ({search_shown})")


if __name__ == "__main__":
    main()
