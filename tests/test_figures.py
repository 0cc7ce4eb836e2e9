"""Every measured figure the README and docs/results.md show (and the harness table of docs/evaluation.md) equals the
committed JSON it comes from, written as the page writes it (issue 21 items 8, 9).

One source: the JSON (`bench/results/*.json`, `assets/*/..._report.json`). A figure is the JSON value formatted
with the decimals the page shows by `shown_as` (Python's correctly rounded `format`, which is what the bench scripts
and reports print with), so 0.845 is written 0.84, never 0.85. A page that retypes a number, rounds it by hand or
keeps an old run's value fails here with the table, row and column. Tables with no JSON behind them are listed in
NO_JSON with the reason; every other table of these pages must be checked by a test below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from doc_helpers import section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# results.md sections whose figures have no JSON (and why); every other `## ` section with a table is checked below
NO_JSON = {"MoE layer speed": "bench/moe.py wrote only markdown on 2026-11-23 (moe-2026-11-23.md): prose, no table"}


def load(name: str) -> dict:
    path = REPO / name if "/" in name else RESULTS / name
    return json.loads(path.read_text())


def shown_as(value: float, like: str) -> str:
    """value written as the figure `like` is written: its decimals, thousands commas, a trailing x / % / unit."""
    m = re.fullmatch(r"(-?[\d,]*\.?\d+)(.*)", like)
    assert m, f"not a figure: {like!r}"
    num, tail = m.groups()
    decimals = len(num.split(".")[1]) if "." in num else 0
    return (f"{value:,.{decimals}f}" if "," in num else f"{value:.{decimals}f}") + tail


def duration(seconds: float) -> str:
    """`26 s`, `5 min 47 s`: how the pages write a wall time."""
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


class Figures:
    """Collects every mismatch, so one run lists them all."""

    def __init__(self):
        self.bad: list[str] = []
        self.checked = 0

    def eq(self, shown: str, value, where: str) -> None:
        shown = clean(shown)
        want = value if isinstance(value, str) else shown_as(value, shown)
        self.checked += 1
        if shown != want:
            self.bad.append(f"{where}: the page shows {shown}, the JSON gives {want}")

    def done(self, at_least: int) -> None:
        assert not self.bad, "\n".join(self.bad)
        assert self.checked >= at_least, f"only {self.checked} figures checked"


def clean(cell: str) -> str:
    return cell.replace("**", "").replace("`", "").strip()


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table of text: rows of header -> cell."""
    out = []
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, flags=re.M):
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()]
        out.append([dict(zip(rows[0], r)) for r in rows[2:]])
    return out


def ci(cell: str) -> tuple[str, str, str]:
    """`0.810 [0.75, 0.86]` -> ("0.810", "0.75", "0.86")."""
    m = re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", clean(cell))
    assert m, cell
    return m.groups()


def find(pattern: str, text: str) -> tuple[str, ...]:
    m = re.search(pattern, text, flags=re.S)
    assert m, f"not on the page: {pattern}"
    return m.groups()


RESULTS_MD = "docs/results.md"
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_results_section_with_a_table_is_checked_or_says_why():
    text = (REPO / RESULTS_MD).read_text(encoding="utf-8")
    checked = {"Main job", "Mask-only adapter conversion vs the full one", "Conversion benchmark", "Decoding",
               "Serving", "Training step, block diffusion vs AR", "Post-training: measured effects on the bundled model",
               "Real-size shapes on this CPU"}
    prose = {"Bundled AR parent", "Many devices: FSDP2 on CPU"}  # checked below as sentences
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    for title, body in zip(parts[1::2], parts[2::2]):
        if tables(body):
            assert title.strip() in checked, f"docs/results.md '## {title}' has a table no test checks"
        else:
            assert title.strip() in prose | set(NO_JSON), f"docs/results.md '## {title}': checked nowhere"


def test_training_step_table_and_readme_equal_the_json():
    j, f = load("train-2026-12-06.json"), Figures()
    (rows,) = tables(section(RESULTS_MD, "Training step, block diffusion vs AR"))
    for row, key in zip(rows, ("ar", "bd", "mdlm")):
        f.eq(row["tokens/s"], j[f"{key}_tokens_per_s"], f"training {key} tokens/s")
        f.eq(row["step ms"], j[f"{key}_step_ms"], f"training {key} step ms")
        f.eq(row["peak MB (RSS growth)"], j[f"{key}_peak_mb"], f"training {key} peak MB")
        f.eq(row["throughput vs AR"], j.get(f"{key}_vs_ar_throughput", 1.0), f"training {key} throughput vs AR")
        f.eq(row["memory vs AR"], j.get(f"{key}_vs_ar_memory", 1.0), f"training {key} memory vs AR")
    assert j["memory_metric"] == "peak RSS growth"  # VmHWM growth (bench/machine.peak_rss_mb), not ru_maxrss
    readme = re.findall(r"(\d\.\d+x) an AR step's tokens/s with (\d\.\d+x) its\s+peak memory", README) + \
        re.findall(r"block diffusion (\d\.\d+x) AR's tokens/s, (\d\.\d+x) its peak memory", README)
    assert len(readme) == 2, readme
    for thr, mem in readme:
        f.eq(thr, j["bd_vs_ar_throughput"], "README training throughput")
        f.eq(mem, j["bd_vs_ar_memory"], "README training memory")
    f.done(19)


def decode_key(label: str) -> str:
    label = clean(label)
    if "window 4" in label:
        return label.split(",")[0] + "-w4"
    if label.startswith("AR parent"):
        return "ar"
    if label.startswith("converted as AR"):
        return "own-ar"
    return label.split()[0]


def test_decoding_table_and_readme_equal_the_json():
    j, f = load("decode-2026-12-06.json"), Figures()
    (rows,) = tables(section(RESULTS_MD, "Decoding"))
    assert len(rows) == 18
    for row in rows:
        r = j[f"batch{row['batch']}"][decode_key(row["decoder"])]
        where = f"decoding batch {row['batch']} {clean(row['decoder'])}"
        acc, lo, hi = ci(row["task accuracy [95% CI]"])
        f.eq(acc, r["accuracy"], where + " accuracy")
        f.eq(lo, r["accuracy_ci"][0], where + " CI low")
        f.eq(hi, r["accuracy_ci"][1], where + " CI high")
        for col, key in (("task tokens/s", "task_tps"), ("task TPF", "task_tpf"), ("task vs AR", "task_vs_ar"),
                         ("code tokens/s", "tps"), ("code TPF", "tpf"), ("code vs AR", "vs_ar")):
            f.eq(row[col], r.get(key, 1.0 if decode_key(row["decoder"]) == "ar" else None), f"{where} {col}")
    spec, s = j["batch1"]["spec"], j["batch1"]["S"]
    got = find(r"spec (\S+) on tasks, (\S+) on code, token for token its own AR output; S mode (\S+) / (\S+) \|", README)
    for shown, value, what in zip(got, (spec["task_vs_ar"], spec["vs_ar"], s["task_vs_ar"], s["vs_ar"]),
                                  ("spec tasks", "spec code", "S tasks", "S code")):
        f.eq(shown, value, f"README decoding {what}")
    f.done(18 * 9 + 4)


SERVE_KEYS = {"S mode": "S", "Q mode": "Q", "spec": "spec", "AR": "AR (parent)"}


def test_serving_table_and_readme_equal_the_json():
    j, f = load("serve-2026-12-06.json"), Figures()
    (rows,) = tables(section(RESULTS_MD, "Serving"))
    for row in rows:
        key = SERVE_KEYS[clean(row["server"]).split(", ")[-1]]
        lv = j["levels"][key]
        for c in ("1", "4", "16", "64"):
            f.eq(row[f"c = {c}"], lv[c]["tps"], f"serving {key} c={c}")
        f.eq(row["TTFT p50 at c = 16"], lv["16"]["ttft_p50_s"], f"serving {key} TTFT")
        p50, p99 = clean(row["latency p50 / p99 at c = 16"]).split(" / ")
        f.eq(p50, lv["16"]["latency_p50_s"], f"serving {key} latency p50")
        f.eq(p99, lv["16"]["latency_p99_s"], f"serving {key} latency p99")
        f.eq(row["TPF"], j["tpf"][key], f"serving {key} TPF")
        acc, lo, hi = ci(row["task accuracy"])
        a = j["accuracy"][key]
        f.eq(acc, a["acc"], f"serving {key} accuracy")
        f.eq(lo, a["ci95"][0], f"serving {key} CI low")
        f.eq(hi, a["ci95"][1], f"serving {key} CI high")
    got = find(r"spec (\d+) tokens/s, the parent's AR server (\d+), S mode (\d+) \|", README)
    for shown, key in zip(got, ("spec", "AR (parent)", "S")):
        f.eq(shown, j["levels"][key]["16"]["tps"], f"README serving {key}")
    f.done(4 * 11 + 3)


def test_harness_table_equals_the_json():
    j, f = load("harness-2026-12-07.json"), Figures()
    text = section("docs/evaluation.md", "Quick start on the bundled models")
    (rows,) = [t for t in tables(text) if "blockdiff_tasks_mc acc" in t[0]]
    for row, r in zip(rows, j["rows"]):
        assert clean(row["model (`--model_args`)"]).startswith(r["model_args"])
        assert f"python -m blockdiff.eval.harness {r['command'].split('harness ', 1)[1]}\n" in text  # as measured
        for col, key in (("blockdiff_tasks_gen exact_match", "gen_exact_match"), ("blockdiff_tasks_mc acc", "mc_acc")):
            value, err = clean(row[col]).split(" +- ")
            f.eq(value, r[key], f"harness {r['model_args']} {col}")
            f.eq(err, r[key + "_stderr"], f"harness {r['model_args']} {col} stderr")
        f.eq(row["wall (1 thread, `--batch_size 16`)"], duration(r["wall_s"]), f"harness {r['model_args']} wall")
    assert len(rows) == len(j["rows"]) == 2 and j["machine"]["threads"] == 1
    f.done(10)


def test_adapter_table_and_readme_equal_the_json():
    j, f = load("convert-adapter-2026-12-06.json"), Figures()
    text = section(RESULTS_MD, "Mask-only adapter conversion vs the full one")
    (rows,) = tables(text)
    for row, key in zip(rows, ("full", "adapter")):
        r, t = j["runs"][key], j["runs"][key]["train"]
        trainable = clean(row["trainable"]).split(" (")
        f.eq(trainable[0], t["trainable_params"], f"adapter {key} trainable")
        if len(trainable) > 1:
            f.eq(trainable[1].rstrip(")"), 100 * t["trainable_params"] / t["parent_params"], f"adapter {key} share")
        f.eq(row["train wall"], t["wall_s"], f"adapter {key} train wall")
        f.eq(row["peak RSS"], t["peak_rss_mb"], f"adapter {key} peak RSS")
        f.eq(row["spec == parent"], r["spec_agrees_with_parent"], f"adapter {key} spec == parent")
        f.eq(row["spec acc."], r["modes"]["spec"]["accuracy"], f"adapter {key} spec accuracy")
        f.eq(row["spec TPF"], r["modes"]["spec"]["tpf"], f"adapter {key} spec TPF")
        f.eq(row["spec vs parent"], r["modes"]["spec"]["vs_parent"], f"adapter {key} spec vs parent")
        for mode in ("S", "Q", "threshold"):
            f.eq(row[f"{mode} acc."], r["modes"][mode]["accuracy"], f"adapter {key} {mode} accuracy")
    acc, lo, hi, tps = find(r"The AR parent scores ([\d.]+) \[([\d.]+), ([\d.]+)\] at (\d+) tokens/s", text)
    for shown, value in zip((acc, lo, hi, tps), (j["parent"]["accuracy"], *j["parent"]["ci95"], j["parent"]["tps"])):
        f.eq(shown, value, "adapter parent")
    block = [r["modes"][m]["accuracy"] for m in ("S", "Q", "threshold")]
    full = [j["runs"]["full"]["modes"][m]["accuracy"] for m in ("S", "Q", "threshold")]
    got = find(r"spec == parent on \*\*([\d.]+)\*\* of prompts \(full: ([\d.]+)\); block modes ([\d.]+)-([\d.]+) against "
               r"([\d.]+)-([\d.]+) \|", README)
    for shown, value in zip(got, (j["runs"]["adapter"]["spec_agrees_with_parent"], j["runs"]["full"][
            "spec_agrees_with_parent"], min(block), max(block), min(full), max(full))):
        f.eq(shown, value, "README adapter")
    got = find(r"the block modes score ([\d.]+)-([\d.]+) against the full conversion's ([\d.]+)-([\d.]+);", text)
    for shown, value in zip(got, (min(block), max(block), min(full), max(full))):
        f.eq(shown, value, "adapter block modes")
    f.done(10 + 11 + 4 + 6 + 4)


def test_conversion_benchmark_table_equals_the_json():
    j, f = load("convert-2026-12-02.json"), Figures()
    (rows,) = tables(section(RESULTS_MD, "Conversion benchmark"))
    variants = list(j["variants"].values())
    assert len(rows) == len(variants)
    for row, v in zip(rows, variants):
        cols = [c for c in row if c.endswith("M") or c.endswith("M tokens")]
        assert len(cols) == len(v["points"])
        for col, p in zip(cols, v["points"]):
            f.eq(col.split("M")[0] + "M", f"{p['tokens'] / 1e6:.2f}M", f"conversion header {col}")
            f.eq(row[col], p["accuracy"]["Q"], f"conversion {clean(row[next(iter(row))])} at {col}")
        f.eq(row["TPF (Q)"], v["points"][-1]["tpf"]["Q"], f"conversion {clean(row[next(iter(row))])} TPF")
    f.done(7 * 9)


def test_main_job_tables_and_readme_equal_the_reports():
    """2026-12-02: assets/tiny-bd/conversion_report.json (the main job's report, kept with its result); 2026-12-06:
    bench/results/main-job-2026-12-06.json (that `make demo` run's runs/tiny-wsd/report.json)."""
    first, later, f = load("assets/tiny-bd/conversion_report.json"), load("main-job-2026-12-06.json"), Figures()
    text = section(RESULTS_MD, "Main job")
    phases, models, spec_run = tables(text)
    for row, p in zip(phases, first["phases"]):
        assert clean(row["phase"]) == p["phase"] and int(row["step"]) == p["step"]
        f.eq(row["val ELBO ppl"], p["val_elbo_ppl"], f"main job {p['phase']} val ELBO ppl")
    for rows, report, extra in ((models, first, ()), (spec_run, later, ("vs parent",))):
        t = report["tasks"]
        parent = t["parent_rows"]["AR"] if "AR" in t["parent_rows"] else next(iter(t["parent_rows"].values()))
        by_mode = {clean(r["decoding"]).split()[0]: r for r in t["converted_rows"].values()}
        for row in rows:
            mode = clean(row["decoding"]).split()[0]
            r = parent if clean(next(iter(row.values()))).startswith("AR parent") else by_mode[mode]
            where = f"main job ({report['train_tokens_per_s']} tokens/s run) {mode}"
            f.eq(row["accuracy"], r["accuracy"], where + " accuracy")
            lo, hi = clean(row["95% CI"]).strip("[]").split(", ")
            f.eq(lo, r["ci95"][0], where + " CI low")
            f.eq(hi, r["ci95"][1], where + " CI high")
            for task in ("add", "lookup", "reverse", "sort"):
                f.eq(row[task], r["per_task"][task], f"{where} {task}")
            f.eq(row["TPF"], r["tpf"], where + " TPF")
            f.eq(row["tokens/s"], r["tps"], where + " tokens/s")
            if extra:
                f.eq(row["vs parent"], r["tps"] / parent["tps"], where + " vs parent")
    s = {clean(r["decoding"]).split()[0]: r for r in first["tasks"]["converted_rows"].values()}["S"]
    for task, shown in re.findall(r"(add|lookup|reverse|sort) ([\d.]+)", find(r"TPF per task \(S\): ([^\n]+)", text)[0]):
        f.eq(shown, s["tpf_per_task"][task], f"main job S TPF {task}")
    f.eq(find(r"training 8 min 38 s at (\d+) tokens/s", text)[0], first["train_tokens_per_s"], "main job tokens/s")
    t = later["tasks"]
    conv = {clean(r["decoding"]).split()[0]: r for r in t["converted_rows"].values()}
    got = find(r"held-out accuracy: parent ([\d.]+), converted S / Q ([\d.]+); spec \*\*([\d.]+)\*\* at ([\d.]+x) the",
               README)
    ref = first["tasks"]["converted_rows"]
    sq = {clean(r["decoding"]).split()[0]: r["accuracy"] for r in ref.values()}
    assert sq["S"] == sq["Q"]
    for shown, value, what in zip(got, (t["ar_parent"]["accuracy"], sq["S"], conv["spec"]["accuracy"],
                                        conv["spec"]["tps"] / t["ar_parent"]["tps"]),
                                  ("parent", "S / Q", "spec", "spec vs parent")):
        f.eq(shown, value, f"README main job {what}")
    f.done(5 + 4 * 9 + 3 * 10 + 4 + 1 + 4)


def test_post_training_table_and_readme_equal_the_json():
    sft, cap = load("posttrain-sft-2026-12-02.json")["results"], load("posttrain-cap-2026-12-02.json")["results"]
    dpo, rl = load("posttrain-dpo-2026-12-02.json")["results"], load("posttrain-rl-2026-12-02.json")["results"]
    f = Figures()
    rows = {clean(r["effect"]).split()[0]: r["result"] for r in tables(section(
        RESULTS_MD, "Post-training: measured effects on the bundled model"))[0]}
    got = find(r"([\d.]+) -> ([\d.]+)\*\* \(sort ([\d.]+), lookup ([\d.]+), reverse ([\d.]+), add ([\d.]+)\); "
               r"TPF ([\d.]+) -> ([\d.]+)", rows["SFT"])
    a = sft["after"]
    for shown, value in zip(got, (sft["before"]["accuracy"], a["accuracy"], *(a["per_task"][k] for k in (
            "sort", "lookup", "reverse", "add")), sft["before"]["tpf"], a["tpf"])):
        f.eq(shown, value, "post-training SFT")
    got = find(r"TPF \*\*([\d.]+) -> ([\d.]+)\*\* \(\+(\d+)%\), accuracy ([\d.]+) -> ([\d.]+)", rows["CAP"])
    c0, c1 = cap["sft"], cap["sft+cap"]
    for shown, value in zip(got, (c0["tpf"], c1["tpf"], 100 * (c1["tpf"] / c0["tpf"] - 1), c0["accuracy"],
                                  c1["accuracy"])):
        f.eq(shown, value, "post-training CAP")
    got = find(r"([\d.]+) -> ([\d.]+); mean ELBO margin (-?[\d.]+) -> (-?[\d.]+) nats", rows["DPO"])
    for shown, value in zip(got, (dpo["before"]["pref_acc"], dpo["dpo"]["pref_acc"], dpo["before"]["elbo_margin"],
                                  dpo["dpo"]["elbo_margin"])):
        f.eq(shown, value, "post-training DPO")
    got = find(r"greedy ([\d.]+) -> ([\d.]+), \*\*sampled ([\d.]+) -> ([\d.]+)\*\*", rows["EBPO"])
    for shown, value in zip(got, (rl["before"]["greedy_reward"], rl["ebpo"]["greedy_reward"],
                                  rl["before"]["sampled_reward"], rl["ebpo"]["sampled_reward"])):
        f.eq(shown, value, "post-training EBPO")
    got = find(r"instruction-format accuracy \*\*([\d.]+) -> ([\d.]+)\*\*; CAP: TPF \*\*([\d.]+) -> ([\d.]+)\*\*", README)
    for shown, value in zip(got, (sft["before"]["accuracy"], a["accuracy"], c0["tpf"], c1["tpf"])):
        f.eq(shown, value, "README post-training")
    f.done(8 + 5 + 4 + 4 + 4)


def test_fsdp_and_bundled_parent_sentences_equal_the_json():
    s, base, f = load("scale-2026-12-02.json"), load("assets/tiny-ar/base_model_report.json"), Figures()
    text = section(RESULTS_MD, "Many devices: FSDP2 on CPU")
    got = find(r"plain loop (\d+) tokens/s, FSDP2 at 1 rank (\d+) \(overhead ([\d.]+) %\), FSDP2 at 2\s+ranks (\d+) "
               r"tokens/s \(([\d.]+x)\)", text)
    for shown, value in zip(got, (s["tokens_per_s_plain"], s["tokens_per_s_1rank"], 100 * s["fsdp_overhead"],
                                  s["tokens_per_s_2ranks"], s["scaling_2ranks"])):
        f.eq(shown, value, "FSDP")
    for shown, value in zip(find(r"2 ranks (\d+) tokens/s \(([\d.]+x)\) \|", README),
                            (s["tokens_per_s_2ranks"], s["scaling_2ranks"])):
        f.eq(shown, value, "README FSDP")
    text = section(RESULTS_MD, "Bundled AR parent")
    got = find(r"accuracy \*\*([\d.]+)\*\* on (\d+) prompts \(add ([\d.]+),\s+lookup ([\d.]+), reverse ([\d.]+), sort "
               r"([\d.]+)\), val NLL ([\d.]+)", text)
    for shown, value in zip(got, (base["heldout_task_accuracy"], base["eval_prompts"], *(base["per_task"][k] for k in (
            "add", "lookup", "reverse", "sort")), base["val_nll"])):
        f.eq(shown, value, "bundled parent")
    f.done(5 + 2 + 7)


# measured, but without the CPU model: bench/loss_memory.py records platform.machine() and os.cpu_count()
MACHINE_WITHOUT_MODEL = {"loss-memory-2026-12-06.json"}


def test_results_record_measured_machines():
    """A result's machine is what the run measured (blockdiff.machine.describe(), a CPU model name) or absent with
    a note, never a literal a script typed (the posttrain results of 2026-11-23 / 12-02 wrote '2-core CPU')."""
    bad = []
    for path in sorted(RESULTS.glob("*.json")):
        text = path.read_text()
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = json.loads(text.strip().splitlines()[-1])
        m = record.get("machine") if isinstance(record, dict) else None
        if path.name in MACHINE_WITHOUT_MODEL:
            continue
        if isinstance(m, str) and not re.search(r"Intel|AMD|EPYC|Xeon|ARM|Apple|NVIDIA", m):
            bad.append(f"{path.name}: machine {m!r}")
    assert not bad, "\n".join(bad)


def test_bench_peak_memory_is_vmhwm_not_ru_maxrss():
    """ru_maxrss carries a forking parent's peak on Linux (commit 7fb94f0): the bench scripts measure VmHWM through
    bench/machine.peak_rss_mb, whose ru_maxrss is only the fallback where /proc is missing (not Linux). A small parent
    reading its children's peak (RUSAGE_CHILDREN) is another measurement and allowed."""
    users = [p.name for p in sorted((REPO / "bench").glob("*.py")) if "RUSAGE_SELF" in p.read_text()]
    assert users == ["machine.py"], users
    text = (REPO / "bench/machine.py").read_text()
    assert text.index("VmHWM") < text.index("RUSAGE_SELF")  # the fallback


@pytest.mark.parametrize("value, like, want", [(0.845, "0.85", "0.84"), (0.519, "0.52x", "0.52x"),
                                               (1733.4, "1,733 MB", "1,733 MB"), (3969.0, "3969", "3969"),
                                               (-1.1177, "-1.12", "-1.12"), (22.5568, "22.56", "22.56")])
def test_shown_as_rounds_as_python_formats(value, like, want):
    assert shown_as(value, like) == want


@pytest.mark.parametrize("page,heading,md", [("docs/distributed.md", "The memory plan", "plan-shapes-2026-12-07.md"),
                                             (RESULTS_MD, "Real-size shapes on this CPU", "realsize-2026-12-07.md")])
def test_bench_tables_are_shown_as_the_bench_wrote_them(page, heading, md):
    """Tables a bench writes itself (from the same numbers as its JSON) are pasted, not retyped: every table row of
    the section is a line of the bench's markdown, and the JSON it wrote from the same numbers is committed beside it."""
    written = (RESULTS / md).read_text(encoding="utf-8").splitlines()
    rows = re.findall(r"^\|.*\|$", section(page, heading), flags=re.M)
    assert rows, f"{page} '## {heading}' shows no table"
    missing = [r for r in rows if r not in written]
    assert not missing, f"{page} '## {heading}': rows not in bench/results/{md}:\n" + "\n".join(missing)
    assert (RESULTS / md.replace(".md", ".json")).is_file()


def test_real_size_row_of_the_readme_equals_the_json():
    j, plan, f = load("realsize-2026-12-07.json"), load("plan-shapes-2026-12-07.json"), Figures()
    got = find(r"conversion ([\d.]+) tokens/s at ([\d.]+ GiB) peak \(plan ([\d.]+ GiB)\); decoding: the parent "
                  r"([\d.]+) tokens/s, S mode ([\d.]+x) .*? within (\d+%) of the measured peak on (\d) real shapes", README)
    c, d = j["convert"], j["decode"]
    for shown, value in zip(got, (c["train_tokens_per_s"], c["peak_rss_gib"], c["plan_gib"], d["ar"]["task_tps"],
                                  d["S"]["task_vs_ar"], 100 * plan["worst_abs_error"], len(plan["rows"]))):
        f.eq(shown, value, "README real-size")
    f.done(7)
