"""The evaluation page (evaluation_page.py): a fixture evaluation with known numbers, rendered and read back in
a real headless Chromium (the browser tier), plus fast checks without a browser: --report --html writes one,
figures move beside the page past the size limit, ECE by hand.

The fixture: 10 questions, 4-option; fine_tuned/score right on 7; base/score; fine_tuned/generate with one
unparsed answer and one reasoning that holds <script>; every figure but one on disk."""
import json
import math
import os
import shutil
from collections import Counter

import pytest
from conftest import run_in_process

import evaluation_page
import inference_example as inference

BROWSER_SKIP = "browser tier did not run"
INSTALL = "apt-get install chromium chromium-driver (as root, after apt-get update), then make test again"
GOLD = "ABCDABCDAB"
TUNED = "ABCDABCACD"  # wrong on questions 7, 8, 9
BASE = "BBCBBBCBBA"
GENERATED = ["A", None, "C", "D", "A", "B", "A", "D", "A", "B"]
SCRIPT = "<script>window.__pwned = 1</script>"
MISSING = 9  # this question's figure file is absent
pytestmark = pytest.mark.xdist_group("browser")  # one worker, so the tier shares one browser (make test: -n auto)


def scores(predicted, confidence):
    """Option log-probabilities whose softmax gives `predicted` the probability `confidence`."""
    rest = (1 - confidence) / 3
    return {letter: math.log(confidence if letter == predicted else rest) for letter in "ABCD"}


def record(i, predicted, **extra):
    return {"id": f"q{i}", "question": f"Which finding is shown in figure {i}? <b>not bold</b>",
            "options": ["Liver cyst", "Splenic infarct", "Renal stone", "Lung nodule"],
            "figure_path": f"PMC{i}_F1.jpg", "gold": GOLD[i], "predicted": predicted,
            "correct": predicted == GOLD[i], **extra}


def fixture_records():
    confidences = [0.9, 0.8, 0.7, 0.95, 0.6, 0.55, 0.45, 0.85, 0.65, 0.35]
    tuned = [record(i, p, option_scores=scores(p, c), samples=None) for i, (p, c) in enumerate(zip(TUNED,
                                                                                                  confidences))]
    base = [record(i, p, option_scores=scores(p, 0.3), samples=None) for i, p in enumerate(BASE)]
    generated = []
    for i, p in enumerate(GENERATED):
        text = f"{SCRIPT} the pattern decides it" if i == 4 else "</think>\n\nAnswer: " + (p or "unsure")
        generated.append(record(i, p, option_scores=None, samples=[
            {"text": text, "predicted": p, "status": "answered" if p else "unparsed", "tokens": 12,
             "finished": True}]))
    return {"fine_tuned/score": tuned, "fine_tuned/generate": generated, "base/score": base}


def fixture_report(folder):
    """An evaluation_results.json's content for the fixture, summarized by inference_example's own code, with a
    processed folder and its figures on disk."""
    from PIL import Image

    images, processed = folder / "images", folder / "processed"
    images.mkdir(parents=True)
    processed.mkdir()
    for i in range(10):
        if i != MISSING:
            Image.new("RGB", (300 + 10 * i, 200), (20 * i, 90, 160)).save(images / f"PMC{i}_F1.jpg")
    (processed / "dataset_dict.json").write_text("{}")
    (processed / "preprocessing_stats.json").write_text(json.dumps({"config": {"image_root": str(images)}}))
    results = {name: {**inference.summarize(records, seconds=2.0), "records": records}
               for name, records in fixture_records().items()}
    paired = {"fine_tuned/score - base/score": inference.paired_comparison(results["fine_tuned/score"],
                                                                           results["base/score"])}
    return {"model_name_or_path": "tiny-vlm", "adapter_path": str(folder / "sft" / "final_model"),
            "data_path": str(processed), "split": "test", "reads_images": True, "results": results,
            "paired": paired}


# --- Without a browser ------------------------------------------------------------------------------------
def test_ece_matches_a_hand_computed_case():
    # confidence 0.92 (right), 0.92 (wrong), 0.65 (right): bin 0.9-1.0 holds two at accuracy 0.5, bin 0.6-0.7 one
    records = [{"option_scores": scores("A", c), "predicted": "A", "correct": ok}
               for c, ok in [(0.92, True), (0.92, False), (0.65, True)]]
    ece, bins = evaluation_page.expected_calibration_error(records)
    assert ece == pytest.approx(2 / 3 * abs(0.5 - 0.92) + 1 / 3 * abs(1.0 - 0.65))
    assert [(b["low"], b["n"]) for b in bins] == [(pytest.approx(0.6), 1), (pytest.approx(0.9), 2)]
    assert evaluation_page.expected_calibration_error([{"option_scores": None}]) is None


def test_report_html_writes_one_page_for_the_named_runs(tmp_path):
    report = fixture_report(tmp_path)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(report))
    second.write_text(json.dumps({**report, "results": {"fine_tuned/score": report["results"]["base/score"]}}))
    page = tmp_path / "out" / "both.html"
    result = run_in_process(inference.main, "--report", f"vlm={first}", f"text_only={second}", "--html", page)
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    assert f"wrote {page}" in result.stdout
    for name in ("vlm/fine_tuned/score", "text_only/fine_tuned/score", "vlm/fine_tuned/score - text_only/"
                                                                        "fine_tuned/score"):
        assert name in html and name in result.stdout
    assert "http://" not in html and "https://" not in html and "<b>not bold</b>" not in html


def test_figures_go_to_a_folder_beside_the_page_past_the_size_limit(tmp_path):
    report = fixture_report(tmp_path)
    embedded = evaluation_page.write_page(report, tmp_path / "one.html").read_text()
    assert embedded.count('src="data:image/jpeg;base64,') == 9 and "embedded in this file" in embedded
    linked = evaluation_page.write_page(report, tmp_path / "two.html", embed_limit_bytes=1000).read_text()
    assert "data:image" not in linked and "two_figures/ beside this page" in linked
    assert len(list((tmp_path / "two_figures").glob("*.jpg"))) == 9
    assert linked.count("figure unavailable") == 1


# --- In a real browser ------------------------------------------------------------------------------------
def chromium_driver():
    """A selenium driver on Debian's headless chromium that logs the console and the network (also used by
    bench/bench_report_page.py), or None where chromium, chromium-driver or selenium is missing."""
    driver_path, chromium = shutil.which("chromedriver"), shutil.which("chromium")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not (driver_path and chromium):
        return None
    os.environ.setdefault("SE_OFFLINE", "1")  # selenium must not look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the tier; skipped with one line where it is not installed, failed under CI."""
    driver = chromium_driver()
    if driver is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the browser tier; chromium, chromium-driver or selenium is missing: {INSTALL}")
        pytest.skip(f"{BROWSER_SKIP}: no chromium here; {INSTALL}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    report = fixture_report(folder)
    return report, evaluation_page.write_page(report, folder / "evaluation_report.html")


@pytest.fixture
def page(browser, rendered):
    report, path = rendered
    browser.get(path.as_uri())
    return browser, report


def visible_cards(driver):
    return driver.execute_script("return [...document.querySelectorAll('article.card')]"
                                 ".filter(card => !card.hidden).length")


def shown(driver):
    return driver.find_element("id", "shown").text


@pytest.mark.browser
def test_summary_row_shows_accuracy_and_interval(page):
    driver, report = page
    tuned = report["results"]["fine_tuned/score"]
    cells = [td.text for td in driver.find_elements("css selector", 'tr[data-result="fine_tuned/score"] td')]
    low, high = inference.wilson_interval(7, 10)
    assert cells[:4] == ["fine_tuned/score", "10", "0.700", f"[{low:.3f}, {high:.3f}]"]
    assert tuned["accuracy"] == 0.7


@pytest.mark.browser
def test_filters_count_the_rows_they_show(page):
    driver, _ = page
    assert len(driver.find_elements("css selector", "article.card")) == 10 and shown(driver) == "10 of 10 shown"
    driver.find_element("id", "f-wrong").click()  # the method chosen first: fine_tuned/score
    assert visible_cards(driver) == 3 and shown(driver) == "3 of 10 shown"
    driver.execute_script("const s = document.getElementById('f-method');"
                          "s.value = [...s.options].find(o => o.text === 'fine_tuned/generate').value;"
                          "s.dispatchEvent(new Event('change'))")
    wrong_generated = sum(p != g for p, g in zip(GENERATED, GOLD))  # the unparsed answer is wrong
    assert visible_cards(driver) == wrong_generated == 2
    driver.find_element("id", "f-wrong").click()
    driver.find_element("id", "f-search").send_keys("no such words anywhere")
    assert visible_cards(driver) == 0 and shown(driver) == "0 of 10 shown"


@pytest.mark.browser
def test_base_and_fine_tuned_disagree_filter(page):
    driver, _ = page
    driver.find_element("id", "f-disagree").click()
    assert visible_cards(driver) == sum(t != b for t, b in zip(TUNED, BASE))


@pytest.mark.browser
def test_confusion_cells_equal_the_hand_count(page):
    driver, _ = page
    for name, records in fixture_records().items():
        counted = Counter((r["gold"], r["predicted"] or "unparsed") for r in records)
        cells = driver.execute_script(
            "return [...[...document.querySelectorAll('table.confusion')].find(t => t.dataset.result === arguments[0])"
            ".querySelectorAll('td')].map(td => [td.dataset.gold, td.dataset.pred, td.textContent])", name)
        assert len(cells) == 4 * 5
        assert {(gold, predicted): int(text) for gold, predicted, text in cells} == \
            {(gold, predicted): counted[gold, predicted] for gold in "ABCD" for predicted in [*"ABCD", "unparsed"]}


@pytest.mark.browser
def test_ece_shown_is_the_python_one(page):
    driver, report = page
    for name in ("fine_tuned/score", "base/score"):
        ece, _ = evaluation_page.expected_calibration_error(report["results"][name]["records"])
        assert driver.find_element("css selector", f'.ece[data-result="{name}"]').text == f"{ece:.3f}"
    assert not driver.find_elements("css selector", '.ece[data-result="fine_tuned/generate"]')


@pytest.mark.browser
def test_figures_load_and_the_missing_one_is_a_placeholder(page):
    driver, _ = page
    widths = driver.execute_script("return [...document.images].map(image => image.complete && image.naturalWidth)")
    assert len(widths) == 9 and all(width > 0 for width in widths), widths
    assert len(driver.find_elements("css selector", ".thumb.missing")) == 1


@pytest.mark.browser
def test_data_is_text_never_markup(page):
    driver, _ = page
    assert driver.execute_script("return window.__pwned") is None
    reasoning = driver.execute_script("return [...document.querySelectorAll('details pre')].map(p => p.textContent)")
    assert any(SCRIPT in text for text in reasoning)
    assert not driver.find_elements("css selector", ".question b")


@pytest.mark.browser
def test_no_console_error_and_no_request_beyond_the_file(page):
    driver, _ = page
    driver.find_element("id", "f-search").send_keys("figure 3")  # the script runs
    assert shown(driver) == "1 of 10 shown"
    errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    requested = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requested if m["method"] == "Network.requestWillBeSent"]
    assert urls and all(url.startswith(("file:", "data:")) for url in urls), urls
