"""How an evaluation is shown: the console's summary lines, and one HTML page that opens from disk.

    write_page(report, "evaluation_report.html")   # what inference_example.py --evaluate and --report --html call

The page carries everything it needs: inline CSS, one classic inline script (Chromium blocks ES modules and
fetch() on file:// pages), charts drawn here as inline SVG, figure thumbnails embedded as data: URIs, or
written to a folder beside the page once embedding them would pass EMBED_LIMIT_BYTES. It makes no network
request. Jinja2 autoescapes every string taken from the data, so a question or a model's reasoning holding
<script> shows as text. Only the standard library, Jinja2 and (for thumbnails) Pillow run here.
"""
import base64
import datetime
import io
import json
import math
from pathlib import Path

import common
import model_kinds
from common import LETTERS, UsageError

TEMPLATE = Path(__file__).resolve().parent / "templates" / "evaluation_report.html.j2"
THUMBNAIL_PX = 256
EMBED_LIMIT_BYTES = 25_000_000  # a browser opens a bigger single file slowly; beyond it the figures go beside it
CALIBRATION_BINS = 10
# The summary table's columns after model/method, with the console's widths: the page shows the same cells.
SUMMARY_COLUMNS = [("n", 6), ("accuracy", 10), ("95% CI", 17), ("unparsed", 10), ("no answer", 10),
                   ("majority", 10), ("q/s", 9)]


# --- The summary, formatted once for the console and the page ---------------------------------------------
def report_text(report):
    """The summary table (header and rows of formatted cells) and the lines under it as (kind, text): kinds
    baseline, warning, vote, paired and note. print_report and the page both show exactly these strings."""
    results = report["results"]
    rows = []
    for name, r in results.items():
        speed = r["questions_per_second"]
        rows.append([name, str(r["n"]), f"{r['accuracy']:.3f}", f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
                     f"{r['parse_failure_rate']:.3f}", f"{r['no_answer_within_budget_rate']:.3f}",
                     f"{r['majority_letter_baseline']:.3f}", "-" if speed is None else f"{speed:.1f}"])
    first = next(iter(results.values()))
    lines = [("baseline", f"chance baseline {first['chance_baseline']:.3f}; majority letter "
                          f"{first['majority_letter']} {first['majority_letter_baseline']:.3f}")]
    for name, r in results.items():
        if r["collapse_warning"]:
            lines.append(("warning", f"WARNING {name}: {r['collapse_warning']}"))
        if "mean_sample_accuracy" in r and r["n"] and len(r["records"][0]["samples"]) > 1:
            lines.append(("vote", f"{name}: majority vote {r['accuracy']:.3f}, "
                                  f"mean per sample {r['mean_sample_accuracy']:.3f}"))
    for pair, p in report.get("paired", {}).items():
        lines.append(("paired", f"{pair}: {p['accuracy_difference']:+.3f} [{p['bootstrap_ci95'][0]:+.3f}, "
                                f"{p['bootstrap_ci95'][1]:+.3f}] paired bootstrap 95%; McNemar exact p = "
                                f"{p['mcnemar_exact_p']:.3g} ({p['only_first_correct']} vs "
                                f"{p['only_second_correct']} discordant)"))
    if any(r.get("mean_generated_tokens") for r in results.values()):
        lines.append(("note", "note: score and letter rank the options without letting the model think; for a "
                              "reasoning model used zero-shot, generate with a thinking budget is the fair number"))
    return {"header": ["model/method", *(name for name, _ in SUMMARY_COLUMNS)], "rows": rows, "lines": lines}


# --- Calibration ------------------------------------------------------------------------------------------
def option_probabilities(option_scores):
    """A scorer's log-probabilities (score: each full answer; letter: each letter token) normalised over the
    question's options: the model's distribution restricted to them (a softmax)."""
    top = max(option_scores.values())
    weights = {letter: math.exp(score - top) for letter, score in option_scores.items()}
    total = sum(weights.values())
    return {letter: weight / total for letter, weight in weights.items()}


def expected_calibration_error(records, bins=CALIBRATION_BINS):
    """ECE = sum over `bins` equal-width confidence bins B of [0, 1] of |B| / n * |accuracy(B) - confidence(B)|,
    where a question's confidence is the probability (option_probabilities) of the option it predicted, and a
    confidence of exactly 1 falls in the last bin. 0 is perfect calibration; a model that says 90% and is
    right 60% of the time scores 0.3. Returns (ece, the non-empty bins as dicts), or None when the records carry
    no option_scores (generate)."""
    scored = [r for r in records if r.get("option_scores")]
    if not scored:
        return None
    table = [[] for _ in range(bins)]
    for r in scored:
        confidence = option_probabilities(r["option_scores"])[r["predicted"]]
        table[min(int(confidence * bins), bins - 1)].append((confidence, r["correct"]))
    ece, shown = 0.0, []
    for i, members in enumerate(table):
        if members:
            accuracy = sum(correct for _, correct in members) / len(members)
            confidence = sum(c for c, _ in members) / len(members)
            ece += len(members) / len(scored) * abs(accuracy - confidence)
            shown.append({"low": i / bins, "high": (i + 1) / bins, "n": len(members), "accuracy": accuracy,
                          "confidence": confidence})
    return ece, shown


# --- Charts: geometry computed here, drawn as SVG by the template -----------------------------------------
def reliability_chart(bins, size=220, margin=30):
    """Bars of accuracy per confidence bin against the diagonal of perfect calibration."""
    span = size - 2 * margin
    x = lambda v: margin + v * span  # noqa: E731
    y = lambda v: size - margin - v * span  # noqa: E731
    bars = [{"x": x(b["low"]), "width": x(b["high"]) - x(b["low"]), "y": y(b["accuracy"]),
             "height": b["accuracy"] * span, "gap_y": y(max(b["accuracy"], b["confidence"])),
             "gap_height": abs(b["accuracy"] - b["confidence"]) * span, **b} for b in bins]
    ticks = [{"value": v, "x": x(v), "y": y(v)} for v in (0, 0.5, 1)]
    return {"size": size, "x0": x(0), "x1": x(1), "y0": y(0), "y1": y(1), "bars": bars, "ticks": ticks}


def interval_chart(rows, low, high, reference, width=360, row_height=22, label_width=0):
    """One row per (label, value, interval): a dot and its interval on a [low, high] axis with a reference line
    (chance for accuracies, 0 for paired differences)."""
    left, right = label_width + 8, width - 12
    x = lambda v: left + (min(max(v, low), high) - low) / (high - low) * (right - left)  # noqa: E731
    shown = [{"label": label, "y": 14 + i * row_height, "x": x(value), "x_low": x(lo), "x_high": x(hi),
              "value": value} for i, (label, value, (lo, hi)) in enumerate(rows)]
    return {"width": width, "height": 24 + len(rows) * row_height, "rows": shown, "reference": x(reference),
            "ticks": [{"x": x(v), "value": v} for v in (low, (low + high) / 2, high)], "left": left, "right": right}


def line_chart(series, y_label, width=340, height=200, margin=36):
    """Polylines for {label: [(step, value), ...]} on shared axes."""
    points = [p for line in series.values() for p in line]
    if not points:
        return None
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    y_min, y_max = (y_min - 0.5, y_max + 0.5) if y_min == y_max else (y_min, y_max)
    x_max = x_max if x_max > x_min else x_min + 1
    x = lambda v: margin + (v - x_min) / (x_max - x_min) * (width - margin - 12)  # noqa: E731
    y = lambda v: height - margin + 12 - (v - y_min) / (y_max - y_min) * (height - margin - 12)  # noqa: E731
    lines = [{"label": label, "points": " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in line),
              "dots": [(x(s), y(v)) for s, v in line] if len(line) < 40 else []}
             for label, line in series.items() if line]
    return {"width": width, "height": height, "lines": lines, "y_label": y_label, "x0": x(x_min), "x1": x(x_max),
            "y0": y(y_min), "y1": y(y_max),
            "x_ticks": [(x(v), f"{v:g}") for v in (x_min, x_max)],
            "y_ticks": [(y(v), f"{v:.3g}") for v in (y_min, (y_min + y_max) / 2, y_max)]}


def training_curves(run):
    """Loss and validation-accuracy charts from the training_summary.json that train_sft_example.py writes
    beside final_model/, or None when it is not there."""
    if not run.get("adapter_path"):
        return None
    adapter = Path(run["adapter_path"])
    summary = next((p for p in (adapter.parent / "training_summary.json", adapter / "training_summary.json")
                    if p.is_file()), None)
    if summary is None:
        return None
    history = json.loads(summary.read_text()).get("log_history", [])
    points = lambda key: [(e["step"], e[key]) for e in history if key in e and "step" in e]  # noqa: E731
    loss = line_chart({"training loss": points("loss"), "validation loss": points("eval_loss")}, "loss")
    accuracy = line_chart({"validation accuracy": points("eval_accuracy")}, "accuracy")
    return {"source": str(summary), "loss": loss, "accuracy": accuracy} if loss or accuracy else None


# --- Figures ----------------------------------------------------------------------------------------------
def image_root(run):
    """The folder a run's figure_path values are relative to (its processed dataset's), or None."""
    if not run.get("reads_images") or not run.get("data_path"):
        return None
    try:
        root = common.read_processed_config(run["data_path"]).get("image_root")
    except (UsageError, OSError, ValueError, KeyError):  # the processed folder moved since the evaluation
        return None
    return Path(root) if root else None


def thumbnail(path):
    """(JPEG bytes of the figure shrunk to THUMBNAIL_PX, '') or (None, why it could not be read)."""
    image, why = model_kinds.open_image(path)
    if image is None:
        return None, why.replace("_", " ")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return buffer.getvalue(), ""


def place_figures(questions, page, limit):
    """Set each question's figure to {'src'} or {'missing': why}; returns the sentence the page shows."""
    wanted = [q for q in questions if q["figure_file"] is not None]
    if not wanted:
        return None
    made = {}
    for q in wanted:
        if q["figure_file"] not in made:
            made[q["figure_file"]] = thumbnail(q["figure_file"])
    images = {path: data for path, (data, _) in made.items() if data}
    # each card embeds its own copy: a figure several questions share counts once per question
    embedded = sum(4 * math.ceil(len(made[q["figure_file"]][0] or b"") / 3) for q in wanted)
    folder = page.parent / f"{page.stem}_figures"
    if embedded > limit:
        folder.mkdir(parents=True, exist_ok=True)
        names = {}
        for i, (path, data) in enumerate(images.items()):
            names[path] = f"{folder.name}/{i}.jpg"
            (folder / f"{i}.jpg").write_bytes(data)
    for q in wanted:
        data, why = made[q["figure_file"]]
        if data is None:
            q["figure"] = {"missing": f"{q['figure_path']}: {why}"}
        elif embedded > limit:
            q["figure"] = {"src": names[q["figure_file"]]}
        else:
            q["figure"] = {"src": "data:image/jpeg;base64," + base64.b64encode(data).decode()}
    missing = len(made) - len(images)
    where = (f"{len(images)} figure thumbnails ({THUMBNAIL_PX} px) are files in {folder.name}/ beside this page: "
             f"embedded they would make it {embedded / 1e6:.0f} MB, over {limit / 1e6:.0f} MB; keep the folder "
             "with the page") if embedded > limit else \
        f"{len(images)} figure thumbnails ({THUMBNAIL_PX} px) are embedded in this file"
    return where + (f"; {missing} figure(s) could not be read (placeholder shown)" if missing else "")


# --- The questions ----------------------------------------------------------------------------------------
def counterpart(name, results):
    """(the base row a fine-tuned row pairs with or None, the real/blank-figure row it pairs with or None)."""
    base = name.replace("fine_tuned/", "base/", 1) if "fine_tuned/" in name else \
        name.replace("base/", "fine_tuned/", 1) if "base/" in name else None
    blank = name.replace("blank_image/", "", 1) if "blank_image/" in name else \
        next((other for other in results if other.replace("blank_image/", "", 1) == name and other != name), None)
    return (base if base in results else None), blank


def question_cards(report, runs):
    """One card per question id across every result row: the question, each row's answer and probabilities,
    and the flags the filters read."""
    results, cards = report["results"], {}
    methods = list(results)
    by_id = {name: {r["id"]: r for r in result["records"]} for name, result in results.items()}
    roots = {prefix: image_root(run) for prefix, run in runs.items()}
    for m, name in enumerate(methods):
        prefix = next((p for p in runs if p and name.startswith(p + "/")), "")
        base, blank = counterpart(name, results)
        for r in results[name]["records"]:
            card = cards.get(r["id"])
            if card is None:
                card = cards[r["id"]] = {"id": r["id"], "question": r["question"], "options": r["options"],
                                         "gold": r["gold"], "figure_path": r.get("figure_path"), "figure": None,
                                         "figure_file": None, "answers": [], "predicted": [None] * len(methods),
                                         "disagree": [], "flip": []}
            if card["figure_file"] is None and roots.get(prefix) and r.get("figure_path"):
                card["figure_file"] = roots[prefix] / r["figure_path"]
            predicted = r["predicted"] or "unparsed"
            card["predicted"][m] = predicted
            for other, flags in ((base, card["disagree"]), (blank, card["flip"])):
                if other and r["id"] in by_id[other] and by_id[other][r["id"]]["predicted"] != r["predicted"]:
                    flags.append(m)
            samples = r.get("samples") or []
            budget = samples and all(s["status"] == "no_answer_within_budget" for s in samples)
            card["answers"].append({
                "method": name, "predicted": "no answer" if budget and not r["predicted"] else predicted,
                "correct": r["correct"],
                "status": samples[0]["status"].replace("_", " ") if len(samples) == 1 and not r["predicted"] else "",
                "probabilities": option_probabilities(r["option_scores"]) if r.get("option_scores") else None,
                "samples": samples})
    for card in cards.values():
        reasoning = " ".join(s.get("text", "") for a in card["answers"] for s in a["samples"])
        card["search"] = " ".join([str(card["id"]), card["question"], *card["options"], reasoning]).lower()
    return methods, list(cards.values())


# --- The page ---------------------------------------------------------------------------------------------
def runs_of(report):
    """The evaluation runs a report holds: --report's named files (report['runs']), or the one run it is."""
    return report.get("runs") or {"": report}


def write_page(report, path, embed_limit_bytes=EMBED_LIMIT_BYTES):
    """Render a report (what evaluation_results.json holds, or combined_report's) to one HTML file at path;
    returns the path."""
    import jinja2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = runs_of(report)
    methods, cards = question_cards(report, runs)
    figures = place_figures(cards, path, embed_limit_bytes)
    results = report["results"]
    calibration = {}
    for name, r in results.items():
        measured = expected_calibration_error(r["records"])
        if measured:
            calibration[name] = {"ece": measured[0], "chart": reliability_chart(measured[1])}
    label_width = 7 * max(map(len, results))
    accuracy_chart = interval_chart([(name, r["accuracy"], r["ci95"]) for name, r in results.items()], 0, 1,
                                    next(iter(results.values()))["chance_baseline"], width=360 + label_width,
                                    label_width=label_width)
    paired = report.get("paired", {})
    paired_chart = interval_chart([(pair, p["accuracy_difference"], p["bootstrap_ci95"]) for pair, p in
                                   paired.items()], -1, 1, 0, width=360 + 7 * max(map(len, paired)),
                                  label_width=7 * max(map(len, paired))) if paired else None
    index = [{"g": c["gold"], "p": c["predicted"], "d": c["disagree"], "f": c["flip"], "s": c["search"]}
             for c in cards]
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = environment.get_template(TEMPLATE.name).render(
        runs=runs, text=report_text(report), results=results, methods=methods, cards=cards, index=index,
        figures=figures, calibration=calibration, accuracy_chart=accuracy_chart, paired_chart=paired_chart,
        curves={prefix: curves for prefix, run in runs.items() if (curves := training_curves(run))},
        letters=LETTERS, has_base=any(counterpart(name, results)[0] for name in results),
        has_blank=any("blank_image/" in name for name in results),
        created=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
    common.write_text_atomic(path, html)
    return path
