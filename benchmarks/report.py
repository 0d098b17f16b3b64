"""Turn step-latency records into the files we publish: a JSON list, a markdown table and a plot.

    python benchmarks/report.py OUT/results.jsonl [more.jsonl ...] [--out-dir benchmarks/results]

Inputs are .jsonl (one record a line, as benchmarks/step_latency.py writes them) or .json (a list, as this script
writes them, so earlier results can be merged in). Records of the older anchors harness (shared/anchors) are
translated on the way in; give --card for files that do not name the GPU.

For every GPU model (card) found, it writes into --out-dir:
  <date>-<card>.json   all records of that card, duplicates removed (the last one of a configuration wins)
  <date>-<card>.md     one table per transformer: latency, speed-up over the one-GPU baseline on the same card
  <date>-<card>.png    per transformer: median latency and speed-up against the number of GPUs
Speed-ups compare against `impl=single` on the same card, model, resolution and text length: "vs eager" against the
eager one-GPU step, "vs same mode" against the one-GPU step compiled the same way (eager against eager; a compile
mode that one GPU has no run of, such as fastusp's "pipeline", against the fastest compiled one-GPU step).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter, defaultdict

# what makes two records the same configuration (a later one replaces an earlier one)
CONFIG_KEY = ("card", "model", "res", "txt", "world", "impl", "config", "compiled", "compile_mode", "backend", "tiny",
              "text_mask", "true_cfg", "controlnet", "controlnet_whole")


# --- reading ------------------------------------------------------------------------------------------------------

def read_records(paths, default_card=None, default_date=None):
    records = []
    for path in paths:
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
        records += [normalize(r, default_card, default_date) for r in rows]
    return records


def normalize(r: dict, default_card=None, default_date=None) -> dict:
    """Bring a record to step_latency.py's field names; anchors records (cp=, compile=, mem_gb=) are translated."""
    r = dict(r)
    if "cp" in r:  # shared/anchors/dit_anchor.py: torch.compile of the whole model, no card, no impl=single
        cp, world = r.pop("cp"), r.get("world", 1)
        if cp == "none":
            r["impl"], r["config"] = "single", "-"
        else:
            r["impl"] = "para-attn" if r.get("impl") == "paraattn" else "diffusers"
            r["config"] = {"ulysses": f"ulysses{world}", "ring": f"ring{world}",
                           "usp": f"ulysses2xring{world // 2}"}.get(cp, cp)
        r["compiled"] = bool(r.pop("compile", 0))
        r["compile_mode"] = "whole" if r["compiled"] else None
        if r.get("mode", "default") != "default":
            r["compile_mode"] = f"whole-{r['mode']}"
        r.pop("mode", None)
        # their mem_gb is the peak of materializing the model in float32 (4 bytes/param), not of the step
        r["build_peak_gb"] = r.pop("mem_gb", None)
        r["compile_s"] = r.pop("warm_s", None)
    r["model"] = {"qwen": "qwen-image"}.get(r.get("model"), r.get("model"))
    if not r.get("card") or r["card"] == "unknown":
        r["card"] = default_card or "unknown"
    if not r.get("date"):
        r["date"] = default_date
    for field in CONFIG_KEY + ("median_ms", "min_ms", "compile_s", "peak_mem_gb", "finite", "err", "date"):
        r.setdefault(field, None)
    r["tiny"] = bool(r["tiny"])
    r["text_mask"] = r["text_mask"] or "ones"  # step_latency records it only when it is not the default
    r["true_cfg"] = r["true_cfg"] or 0
    return r


def dedupe(records):
    latest = {}
    for r in records:
        latest[tuple(r[k] for k in CONFIG_KEY)] = r
    return list(latest.values())


# --- baselines and speed-ups --------------------------------------------------------------------------------------

def workload(r):
    """What one table compares: the same model, size and text, and the same kind of step (--text-mask none,
    --true-cfg and --controlnet change what is timed)."""
    return (r["model"], r["res"], r["txt"], r["tiny"], r["text_mask"], r["true_cfg"], r["controlnet"] or "")


def workload_title(w) -> str:
    model, res, txt, tiny, text_mask, true_cfg, controlnet = w
    return (f"{model} {res}, {txt} text tokens"
            + (f", pipeline step with true CFG {true_cfg:g} (two passes)" if true_cfg else "")
            + (f", with a {controlnet}-block ControlNet" if controlnet else "")
            + (", no text mask" if text_mask == "none" else "") + (" (tiny model)" if tiny else ""))


def ok(r):
    return not r["err"] and r["median_ms"]


def mode_label(r) -> str:
    return (r["compile_mode"] or "compiled") if r["compiled"] else "eager"


def baselines(records):
    """(card, workload) -> {"eager": record, "compiled:<mode>": record, "compiled": record} of one-GPU runs.

    The native attention backend wins over others; "compiled" is the fastest compiled one-GPU run, the baseline of
    compile modes that only a parallel impl has (fastusp's "pipeline")."""
    table = defaultdict(dict)
    singles = [r for r in records if r["impl"] == "single" and ok(r)]
    # non-native first, so a native run put in the same slot afterwards replaces it
    for r in sorted(singles, key=lambda r: r["backend"] in (None, "native")):
        slot = table[(r["card"], workload(r))]
        slot[f"compiled:{r['compile_mode']}" if r["compiled"] else "eager"] = r
    for r in singles:
        slot = table[(r["card"], workload(r))]
        if r["compiled"] and ("compiled" not in slot or r["median_ms"] < slot["compiled"]["median_ms"]):
            slot["compiled"] = r
    return table


def add_speedups(records):
    """Set speedup_vs_eager and speedup_vs_same_mode on every successful record (None where no baseline ran)."""
    base = baselines(records)
    for r in records:
        slot = base.get((r["card"], workload(r)), {})
        same = slot.get(f"compiled:{r['compile_mode']}", slot.get("compiled")) if r["compiled"] else slot.get("eager")
        r["speedup_vs_eager"] = ratio(slot.get("eager"), r)
        r["speedup_vs_same_mode"] = ratio(same, r)
    return records


def ratio(baseline, r):
    if not baseline or not ok(r):
        return None
    return round(baseline["median_ms"] / r["median_ms"], 3)


# --- markdown -----------------------------------------------------------------------------------------------------

def sort_key(r):
    return (r["model"], r["res"] or "", r["txt"] or 0, r["compiled"], r["world"],
            ["single", "diffusers", "para-attn", "fastusp"].index(r["impl"]) if r["impl"] in
            ("single", "diffusers", "para-attn", "fastusp") else 9, r["config"] or "", r["backend"] or "")


def fmt(value, spec="{:.1f}"):
    return "–" if value is None else spec.format(value)


def shorten(text, limit):
    return text if len(text) <= limit else text[:limit - 1] + "…"


def error_cell(r) -> str:
    """The run's error and, when other ranks failed first, theirs: rank 0 often only saw its peer go away."""
    text = shorten(r["err"] or "", 100 if r.get("rank_errors") else 160)
    if r.get("rank_errors"):
        text += "; other ranks: " + shorten(r["rank_errors"][0], 100)
    return " ".join(text.split()).replace("|", "\\|")


def markdown(card, records) -> str:
    versions = sorted({f"torch {r.get('torch')}, diffusers {r.get('diffusers')}, fastusp {r.get('fastusp')}"
                       for r in records})
    dates = sorted({r["date"] for r in records if r["date"]})
    lines = [f"# Step latency on {card}", "",
             f"Dates: {', '.join(dates) or 'unknown'}. Software: {'; '.join(versions)}.", "",
             "One transformer forward (one denoising step; with true CFG, one pipeline step of two forwards), "
             "median over the timed steps; random bf16 weights, "
             "full-size model. Speed-up: one-GPU median / this median, against the eager one-GPU step and against "
             "the one-GPU step compiled the same way (fastusp's pipeline compile: the fastest compiled one-GPU step). "
             "Compile s: wall time of the warm-up calls. Peak GB: rank 0.", ""]
    by_workload = defaultdict(list)
    for r in sorted(records, key=sort_key):
        by_workload[workload(r)].append(r)
    for w, rows in by_workload.items():
        lines += [f"## {workload_title(w)}", "",
                  "| GPUs | impl | config | backend | compiled | median ms | min ms | vs eager | vs same mode "
                  "| compile s | peak GB | finite | error |",
                  "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in rows:
            err = error_cell(r)
            lines.append(
                f"| {r['world']} | {r['impl']} | {config_label(r)} | {r['backend'] or '–'} | {mode_label(r)} "
                f"| {fmt(r['median_ms'])} | {fmt(r['min_ms'])} | {fmt(r.get('speedup_vs_eager'), '{:.2f}×')} "
                f"| {fmt(r.get('speedup_vs_same_mode'), '{:.2f}×')} | {fmt(r['compile_s'])} "
                f"| {fmt(r['peak_mem_gb'])} | {'' if r['finite'] is None else r['finite']} "
                f"| {err} |")
        lines.append("")
    return "\n".join(lines)


def config_label(r) -> str:
    """The config, and for --controlnet-whole that fastusp ran the ControlNet whole on every rank."""
    return r["config"] + (" (ControlNet whole)" if r["controlnet_whole"] else "")


# --- plot ---------------------------------------------------------------------------------------------------------

def strategy(r) -> str:
    """ulysses / ring / usp (both) from either config syntax, plus -fp8, so one line spans several GPU counts."""
    m = re.fullmatch(r"(cfg\d+)?u(\d+)r(\d+)(-fp8\w*)?", r["config"] or "")
    prefix = ""
    if m:
        u, ring = int(m.group(2)), int(m.group(3))
        prefix, suffix = (m.group(1) + "+" if m.group(1) else ""), m.group(4) or ""
    else:
        u = int((re.search(r"ulysses(\d+)", r["config"] or "") or [0, 1])[1])
        ring = int((re.search(r"ring(\d+)", r["config"] or "") or [0, 1])[1])
        suffix = ""
    kind = "usp" if u > 1 and ring > 1 else "ulysses" if u > 1 else "ring" if ring > 1 else "none"
    return prefix + kind + suffix + (" controlnet-whole" if r["controlnet_whole"] else "")


def series(records):
    """(impl, label, compiled) -> sorted [(world, median_ms, speedup_vs_same_mode)] of the multi-GPU runs."""
    lines = defaultdict(list)
    for r in records:
        if r["impl"] == "single" or not ok(r):
            continue
        backend = "" if r["backend"] in (None, "native") else f" {r['backend']}"
        label = f"{r['impl']} {strategy(r)}{backend} {mode_label(r)}"
        lines[(r["impl"], label, r["compiled"])].append((r["world"], r["median_ms"], r.get("speedup_vs_same_mode")))
    return {k: sorted(v) for k, v in sorted(lines.items())}


def plot(card, records, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display on servers
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in records:
        if ok(r):  # failed runs stay in the table with their error; a plot can only show measurements
            groups[workload(r)].append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(15, 4.5 * len(groups)), squeeze=False)
    for row, (w, rows) in zip(axes, sorted(groups.items())):
        plot_workload(row, rows, workload_title(w))
    fig.suptitle(f"Transformer step latency on {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_workload(axes, rows, title):
    """Left: median latency per GPU count, one-GPU runs as horizontal lines. Right: speed-up, ideal = GPU count.
    Solid lines are compiled, dashed eager; circles fastusp, squares diffusers."""
    lat_ax, speed_ax = axes
    worlds = sorted({r["world"] for r in rows} | {1})
    for r in rows:
        if r["impl"] == "single" and ok(r) and r["backend"] in (None, "native"):
            lat_ax.axhline(r["median_ms"], color="gray", linestyle="-" if r["compiled"] else ":", linewidth=1,
                           label=f"1 GPU {mode_label(r)}")
    for (impl, label, compiled), points in series(rows).items():
        style = dict(marker="o" if impl == "fastusp" else "s", linestyle="-" if compiled else "--", label=label)
        line, = lat_ax.plot([p[0] for p in points], [p[1] for p in points], **style)
        sp = [(p[0], p[2]) for p in points if p[2] is not None]
        if sp:  # every line starts at (1 GPU, 1x)
            speed_ax.plot([1] + [p[0] for p in sp], [1.0] + [p[1] for p in sp], color=line.get_color(), **style)
    speed_ax.plot(worlds, worlds, color="gray", linestyle=":", linewidth=1, label="ideal")
    for ax, ylabel in ((lat_ax, "median step latency (ms)"), (speed_ax, "speed-up vs 1 GPU, same mode")):
        ax.set_xlabel("GPUs")
        ax.set_ylabel(ylabel)
        ax.set_xticks(worlds)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    lat_ax.set_ylim(bottom=0)
    if lat_ax.get_legend_handles_labels()[0]:  # a workload with failed runs only has nothing to label
        lat_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    speed_ax.legend(fontsize=7, loc="upper left")


# --- main ---------------------------------------------------------------------------------------------------------

def card_slug(card: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    return re.sub(r"^nvidia-", "", slug) or "unknown"


def write_card(card, records, out_dir, stem=None):
    date = max((r["date"] for r in records if r["date"]), default="undated")
    stem = os.path.join(out_dir, stem or f"{date}-{card_slug(card)}")
    records = sorted(records, key=sort_key)
    with open(stem + ".json", "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(markdown(card, records))
    written = [stem + ".json", stem + ".md"]
    try:
        plot(card, records, stem + ".png")
        written.append(stem + ".png")
    except ImportError:
        print("matplotlib is missing (pip install 'fastusp[bench]'): no plot", file=sys.stderr)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help=".jsonl or .json files of records")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--card", default=None, help="card name for records that lack one (anchors files)")
    ap.add_argument("--date", default=None, help="YYYY-MM-DD for records that lack one (anchors files)")
    ap.add_argument("--stem", default=None, help="file name without extension (default <date>-<card>)")
    a = ap.parse_args(argv)
    records = add_speedups(dedupe(read_records(a.inputs, a.card, a.date)))
    by_card = defaultdict(list)
    for r in records:
        by_card[r["card"]].append(r)
    if a.stem and len(by_card) > 1:
        ap.error(f"--stem names one output but the records cover {len(by_card)} cards: {sorted(by_card)}")
    os.makedirs(a.out_dir, exist_ok=True)
    for card, rows in sorted(by_card.items()):
        counts = Counter("ok" if ok(r) else "failed" for r in rows)
        for path in write_card(card, rows, a.out_dir, a.stem):
            print(path)
        print(f"  {card}: {counts['ok']} ok, {counts['failed']} failed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
