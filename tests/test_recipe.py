"""Recipes and the phase schedule: a TOML recipe loads with paths resolved against its folder, --set overrides
apply, token budgets become steps, the schedule maps steps to phases with the warm-up / decay lr shape, and
every bad recipe fails before any model is loaded with a message naming the file and the field."""

import math
from pathlib import Path

import pytest

from blockdiff.train.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from blockdiff.train.schedule import Schedule

VALID = """
[model]
path = "../models/tiny"

[data]
train = ["data/train.jsonl", "/abs/train2.jsonl"]
valid = ["data/valid.jsonl"]
seq_len = 64
cache_dir = "cache"

[train]
batch_size = 8
grad_accum = 2
warmup_steps = 4
decay_steps = 6
min_lr_ratio = 0.1

[objective]
kind = "diffusion"

[diffusion]
weighting = "token_mean"

[[phases]]
name = "warmup-B1"
block_size = 1
steps = 5
lr = 1e-3

[[phases]]
block_size = 16
tokens = 10000
lr = 1e-3

[[phases]]
name = "stable"
block_size = 64
steps = 10
lr = 5e-4
"""


def write(tmp_path: Path, text: str = VALID, name: str = "recipe.toml") -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir(exist_ok=True)
    p = folder / name
    p.write_text(text)
    return p


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# -------------------------------------------------------------------------------------------- loading
def test_valid_recipe_loads_and_resolves_paths(tmp_path):
    path = write(tmp_path)
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.source == str(path)
    base = path.parent
    assert r.model.path == str((base / "../models/tiny").resolve())
    assert r.data.train == [str((base / "data/train.jsonl").resolve()), "/abs/train2.jsonl"]
    assert r.data.valid == [str((base / "data/valid.jsonl").resolve())]
    assert r.data.cache_dir == str((base / "cache").resolve())
    assert r.data.seq_len == 64 and r.train.batch_size == 8 and r.train.grad_accum == 2
    assert r.diffusion.weighting == "token_mean"
    assert r.diffusion.t_lo == 0.001 and r.train.dtype == "auto"  # defaults fill unset fields
    assert [p.block_size for p in r.phases] == [1, 16, 64]
    assert isinstance(r.phases[0].lr, float)
    d = r.to_dict()
    assert d["phases"][2]["name"] == "stable" and d["data"]["seq_len"] == 64


def test_paths_resolve_against_recipe_folder_not_cwd(tmp_path, monkeypatch):
    path = write(tmp_path)
    monkeypatch.chdir(tmp_path)
    r1 = load_recipe(path)
    monkeypatch.chdir("/")
    r2 = load_recipe(path)
    assert r1.model.path == r2.model.path == str((tmp_path / "models/tiny").resolve())
    assert r1.data.cache_dir == r2.data.cache_dir


def test_empty_cache_dir_stays_empty(tmp_path):
    r = load_recipe(write(tmp_path, edit(VALID, 'cache_dir = "cache"\n', "")))
    assert r.data.cache_dir == ""


def test_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path)
    r = load_recipe(path, {"train.batch_size": 4, "diffusion.weighting": "elbo", "model.path": "other"})
    assert r.train.batch_size == 4
    assert r.diffusion.weighting == "elbo"
    assert r.model.path == str((path.parent / "other").resolve())
    # an override of a section the file does not have
    r = load_recipe(path, {"merge.top_k": 3})
    assert r.merge.top_k == 3
    # an override that breaks the recipe is caught by validation
    with pytest.raises(RecipeError, match=r"\[data\] seq_len"):
        load_recipe(path, {"data.seq_len": 1})
    # overrides are type-checked like the file
    with pytest.raises(RecipeError, match=r"\[train\]\.batch_size: expected int"):
        load_recipe(path, {"train.batch_size": "4"})


@pytest.mark.parametrize("key", ["batch_size", "nosuch.field", "phases.lr"])
def test_bad_override_key(tmp_path, key):
    with pytest.raises(RecipeError, match="--set"):
        load_recipe(write(tmp_path), {key: 1})


def test_unknown_override_field_is_rejected(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown field.*batchsize"):
        load_recipe(write(tmp_path), {"train.batchsize": 4})


def test_token_budget_converts_to_steps(tmp_path):
    r = load_recipe(write(tmp_path))
    tokens_per_step = 8 * 2 * 64
    assert r.tokens_per_step == tokens_per_step
    assert r.phase_steps() == [5, math.ceil(10000 / tokens_per_step), 10]
    assert r.phase_steps()[1] == 10  # 10000 / 1024 = 9.77 -> rounds up
    assert r.total_steps == 25
    # exact multiple: no extra step
    r = load_recipe(write(tmp_path, edit(VALID, "tokens = 10000", f"tokens = {3 * tokens_per_step}")))
    assert r.phase_steps()[1] == 3
    # a larger batch changes the conversion
    r = load_recipe(write(tmp_path), {"train.batch_size": 16})
    assert r.phase_steps()[1] == math.ceil(10000 / (16 * 2 * 64))


def test_integral_float_is_accepted_as_int_and_int_as_float(tmp_path):
    r = load_recipe(write(tmp_path, edit(VALID, "batch_size = 8", "batch_size = 8.0")))
    assert r.train.batch_size == 8 and isinstance(r.train.batch_size, int)
    r = load_recipe(write(tmp_path, edit(VALID, "lr = 5e-4", "lr = 1")))
    assert r.phases[2].lr == 1.0 and isinstance(r.phases[2].lr, float)


def test_bundled_recipe_is_valid():
    path = Path(__file__).resolve().parents[1] / "recipes" / "tiny_wsd.toml"
    if not path.is_file():
        pytest.skip("no bundled recipe")
    r = load_recipe(path)
    assert r.phases and all(p.block_size >= r.data.seq_len or r.data.seq_len % p.block_size == 0 for p in r.phases)


# ------------------------------------------------------------------------------------------- schedule
def test_schedule_maps_steps_to_phases(tmp_path):
    s = Schedule(load_recipe(write(tmp_path)))
    assert s.total_steps == 25
    assert [(p.start, p.end) for p in s.phases] == [(0, 5), (5, 15), (15, 25)]
    assert [p.block_size for p in s.phases] == [1, 16, 64]
    assert [p.name for p in s.phases] == ["warmup-B1", "phase2-B16", "stable"]  # unnamed phases get a name
    assert [s.phase_at(i).index for i in range(25)] == [0] * 5 + [1] * 10 + [2] * 10
    # boundaries
    assert s.phase_at(0).index == 0 and s.phase_at(4).index == 0
    assert s.phase_at(5).index == 1 and s.phase_at(14).index == 1 and s.phase_at(15).index == 2
    assert s.phase_at(24).index == 2
    for bad in (-1, 25, 100):
        with pytest.raises(IndexError, match="outside the schedule"):
            s.phase_at(bad)
    assert [i for i in range(25) if s.is_phase_end(i)] == [4, 14, 24]


def test_schedule_lr_warmup_and_decay_shape(tmp_path):
    s = Schedule(load_recipe(write(tmp_path)))  # warmup 4, decay 6 over 25 steps, min_lr_ratio 0.1
    lrs = [s.lr_at(i) for i in range(25)]
    # linear warm-up over the first 4 steps of the run, reaching the phase lr
    assert lrs[:5] == pytest.approx([1e-3 * k / 4 for k in (1, 2, 3, 4)] + [1e-3])
    # constant inside a phase after warm-up; steps to the phase lr at a boundary
    assert lrs[4:15] == pytest.approx([1e-3] * 11)
    assert lrs[15:19] == pytest.approx([5e-4] * 4)
    # linear decay over the last 6 steps to min_lr_ratio of the phase lr at the final step
    decay = lrs[19:]
    assert decay == pytest.approx([5e-4 * (1 - 0.9 * k / 6) for k in range(1, 7)])
    assert decay[-1] == pytest.approx(5e-4 * 0.1)
    diffs = [a - b for a, b in zip(decay, decay[1:])]
    assert diffs == pytest.approx([diffs[0]] * 5)  # equal steps: linear
    assert all(lr > 0 for lr in lrs)


def test_schedule_without_warmup_or_decay_is_flat(tmp_path):
    r = load_recipe(write(tmp_path), {"train.warmup_steps": 0, "train.decay_steps": 0})
    s = Schedule(r)
    assert [s.lr_at(i) for i in range(25)] == pytest.approx([1e-3] * 15 + [5e-4] * 10)


def test_schedule_decay_longer_than_run_is_clipped(tmp_path):
    r = load_recipe(write(tmp_path), {"train.warmup_steps": 0, "train.decay_steps": 1000, "train.min_lr_ratio": 0.0})
    s = Schedule(r)
    assert s.decay_steps == 25
    assert s.lr_at(24) == pytest.approx(0.0, abs=1e-12)
    assert s.lr_at(0) == pytest.approx(1e-3 * (1 - 1 / 25))


# ---------------------------------------------------------------------------------- validation errors
BAD = [
    # (replace old, with new, fragment the message must contain)
    ("seq_len = 64", "seq_len = 60",
     r"\[\[phases\]\] #2: block_size 16 does not divide seq_len 60"),
    ("block_size = 16", "block_size = 5", r"\[\[phases\]\] #2: block_size 5 does not divide seq_len 64"),
    ("block_size = 1\n", "block_size = 0\n", r"\[\[phases\]\] #1 \(warmup-B1\): block_size must be >= 1"),
    ("steps = 5", "steps = 0", r"\[\[phases\]\] #1 \(warmup-B1\): give exactly one of steps or tokens"),
    ("steps = 5", "steps = -3", r"#1 \(warmup-B1\): give exactly one of steps or tokens.*steps=-3"),
    ("tokens = 10000", "tokens = -1", r"\[\[phases\]\] #2: give exactly one of steps or tokens"),
    ("steps = 5", "steps = 5\ntokens = 100", r"#1 \(warmup-B1\): give exactly one of steps or tokens.*tokens=100"),
    ("lr = 5e-4", "lr = 0.0", r"#3 \(stable\): lr must be > 0"),
    ("lr = 5e-4", "lr = -1e-4", r"#3 \(stable\): lr must be > 0"),
    ("[train]", "[trian]", r"unknown section.*trian"),
    ("grad_accum = 2", "grad_acum = 2", r"\[train\]: unknown field.*grad_acum"),
    ("block_size = 1\n", "block_size = 1\nblocksize = 2\n", r"\[\[phases\]\] #1: unknown field.*blocksize"),
    ("batch_size = 8", 'batch_size = "8"', r"\[train\]\.batch_size: expected int, got '8'"),
    ("batch_size = 8", "batch_size = 8.5", r"\[train\]\.batch_size: expected int"),
    ("batch_size = 8", "batch_size = true", r"\[train\]\.batch_size: expected int"),
    ('weighting = "token_mean"', "weighting = 1", r"\[diffusion\]\.weighting: expected a string"),
    ("lr = 5e-4", 'lr = "5e-4"', r"\[\[phases\]\] #3\.lr: expected float"),
    ('train = ["data/train.jsonl", "/abs/train2.jsonl"]', 'train = "data/train.jsonl"',
     r"\[data\]\.train: expected a list of strings"),
    ('path = "../models/tiny"', 'path = ""', r"\[model\] path is required"),
    ('[model]\npath = "../models/tiny"\n', "", r"\[model\] path is required"),
    ('train = ["data/train.jsonl", "/abs/train2.jsonl"]', "train = []", r"\[data\] train needs at least one"),
    ('kind = "diffusion"\n\n[diffusion]\nweighting = "token_mean"', 'kind = "ar"',
     r"#2: the ar objective needs block_size = 1, got 16"),
    ('kind = "diffusion"', 'kind = "ar"', r"\[diffusion\] is not read by kind 'ar' \(only by diffusion, sft\)"),
    ('kind = "diffusion"', 'kind = "diffusion"\nembed_noise = false',
     r"\[objective\]: embed_noise is now \[noise\] enabled"),
    ('weighting = "token_mean"', 'weighting = "token_mean"\nblock_size = 4',
     r"\[diffusion\]: block_size is set by the run"),
    ('kind = "diffusion"', 'kind = "mdlm"', r"\[objective\] kind must be one of diffusion, ar, sft, dpo, rl, got 'mdlm'"),
    ('weighting = "token_mean"', 'weighting = "mean"', r"\[diffusion\] weighting must be elbo or token_mean"),
    ('weighting = "token_mean"', 'weighting = "elbo"\nt_per = "token"', r"\[diffusion\] t_per must be"),
    ('weighting = "token_mean"', 'weighting = "elbo"\nt_lo = 0.9\nt_hi = 0.2', r"\[diffusion\] need 0 <= t_lo"),
    ("min_lr_ratio = 0.1", 'min_lr_ratio = 0.1\ndtype = "fp16"',
     r"\[train\] dtype must be auto, float32 or bfloat16, got 'fp16'"),
    ("batch_size = 8", "batch_size = 0", r"\[train\] batch_size must be >= 1"),
    ("min_lr_ratio = 0.1", "min_lr_ratio = 1.5", r"\[train\] min_lr_ratio must be in \[0, 1\]"),
    ("warmup_steps = 4", "warmup_steps = -1", r"\[train\] warmup_steps"),
    ("min_lr_ratio = 0.1", 'min_lr_ratio = 0.1\ntrainable = "mask"',
     r"\[train\] trainable must be one of all, mask_embedding, got 'mask'"),
    ('path = "../models/tiny"', 'path = "../models/tiny"\ndecode_block_size = -1',
     r"\[model\] decode_block_size must be >= 0"),
    ('kind = "diffusion"\n\n[diffusion]\nweighting = "token_mean"', 'kind = "ar"',
     r"trainable = \"mask_embedding\" needs a block-diffusion objective", {"train.trainable": "mask_embedding",
                                                                          "phases.2.block_size": 1,
                                                                          "phases.3.block_size": 1}),
    ('kind = "diffusion"\n\n[diffusion]\nweighting = "token_mean"', 'kind = "ar"',
     r"\[model\] decode_block_size is for block-diffusion", {"model.decode_block_size": 32,
                                                            "phases.2.block_size": 1, "phases.3.block_size": 1}),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[2][:40] for b in BAD])
def test_validation_error_names_file_and_field(tmp_path, bad):
    old, new, fragment, *overrides = bad  # optional 4th item: --set overrides applied on top
    path = write(tmp_path, edit(VALID, old, new))
    with pytest.raises(RecipeError, match=fragment) as e:
        load_recipe(path, *overrides)
    assert str(e.value).startswith(str(path)), str(e.value)


def test_no_phases(tmp_path):
    path = write(tmp_path, VALID[:VALID.index("[[phases]]")])
    with pytest.raises(RecipeError, match=r"at least one \[\[phases\]\] table is required") as e:
        load_recipe(path)
    assert str(path) in str(e.value)


def test_phases_not_an_array_of_tables(tmp_path):
    path = write(tmp_path, "phases = 3\n" + VALID[:VALID.index("[[phases]]")])
    with pytest.raises(RecipeError, match=r"'phases' must be an array of tables") as e:
        load_recipe(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("section", ["merge", "model", "data"])
def test_section_that_is_not_a_table(tmp_path, section):
    # [model] and [data] are indexed for path resolution and --set before parsing: still a clear error
    text = VALID if section == "merge" else VALID.replace(f"[{section}]", f"[{section}_was]")
    path = write(tmp_path, f'{section} = "x"\n' + text.replace(f"[{section}_was]", "[unused]"))
    for overrides in (None, {f"{section}.seq_len": 8}):
        with pytest.raises(RecipeError, match=rf"\[{section}\]: expected a table") as e:
            load_recipe(path, overrides)
        assert str(path) in str(e.value)


def test_invalid_toml(tmp_path):
    path = write(tmp_path, VALID + "\n[train\nbatch_size = \n")
    with pytest.raises(RecipeError, match="invalid TOML") as e:
        load_recipe(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(RecipeError, match="recipe file not found") as e:
        load_recipe(path)
    assert str(path) in str(e.value)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path)  # a folder is not a recipe


def test_bad_recipe_is_one_line_and_exit_2_from_the_cli(tmp_path, capsys):
    from blockdiff.cli import main

    path = write(tmp_path, edit(VALID, "batch_size = 8", "batch_size = 0"))
    assert main(["convert", "--recipe", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"blockdiff convert: error: {path}: [train] batch_size must be >= 1, got 0"]
    assert not (tmp_path / "run").exists()


def test_sections_are_the_owners_config_classes(tmp_path):
    from blockdiff.decode.engine import MODES, DecodeConfig
    from blockdiff.objectives.diffusion import DiffusionLossConfig
    from blockdiff.train.rollout import RolloutConfig

    r = load_recipe(write(tmp_path))
    assert type(r.diffusion) is DiffusionLossConfig and type(r.rollout) is RolloutConfig
    assert type(r.rollout.decode) is DecodeConfig
    # defaults stated once: the section's default is the class's default
    assert r.diffusion.t_lo == DiffusionLossConfig().t_lo and r.rollout == RolloutConfig()
    # the rollout threshold is the threshold mode's default from MODES, not a copy
    assert r.rollout.decode.threshold is None and r.rollout.decode.tau_mask == MODES["threshold"][1]


def test_nested_set_and_kind_defaults(tmp_path):
    rl = edit(VALID, 'kind = "diffusion"\n\n[diffusion]\nweighting = "token_mean"', 'kind = "rl"')
    r = load_recipe(write(tmp_path, rl), {"rollout.decode.temperature": 1.5, "rollout.group_size": 8,
                                          "ebpo.eps_high": 0.3})
    assert (r.rollout.decode.temperature, r.rollout.group_size, r.ebpo.eps_high) == (1.5, 8, 0.3)
    assert r.rollout.decode.max_new_tokens == 32  # the other rollout decoding defaults stay
    with pytest.raises(RecipeError, match=r"\[rollout.decode\] temperature must be > 0|decode.temperature must be > 0"):
        load_recipe(write(tmp_path, rl), {"rollout.decode.temperature": 0.0})
    with pytest.raises(RecipeError, match=r"\[rollout.decode\]: block_size is set by the run"):
        load_recipe(write(tmp_path, rl), {"rollout.decode.block_size": 4})
    sft = edit(VALID, 'kind = "diffusion"', 'kind = "sft"')
    assert load_recipe(write(tmp_path, sft)).diffusion.complementary  # LLaDA2.0 SFT default
    assert not load_recipe(write(tmp_path, sft), {"diffusion.complementary": False}).diffusion.complementary
    assert not load_recipe(write(tmp_path)).diffusion.complementary


def test_old_rl_section_says_where_each_field_went(tmp_path):
    old = edit(VALID, 'kind = "diffusion"\n\n[diffusion]\nweighting = "token_mean"',
               'kind = "rl"\n\n[rl]\ngroup_size = 4\nthreshold = 0.9\neps_low = 0.1')
    with pytest.raises(RecipeError, match=r"\[rl\] was split.*group_size is now \[rollout\] group_size; "
                                          r"threshold is now \[rollout.decode\] threshold; eps_low is now \[ebpo\] eps_low"):
        load_recipe(write(tmp_path, old))


def test_parse_recipe_names_its_source():
    raw = {"model": {"path": "/m"}, "data": {"train": ["/t"], "seq_len": 8},
           "phases": [{"block_size": 3, "steps": 1, "lr": 1e-3}]}
    with pytest.raises(RecipeError, match=r"^my-source: \[\[phases\]\] #1: block_size 3 does not divide seq_len 8"):
        parse_recipe(raw, source="my-source")
    raw["phases"][0]["block_size"] = 8
    assert parse_recipe(raw, source="my-source").phase_steps() == [1]
    raw["phases"][0]["block_size"] = 32  # >= seq_len: MDLM, allowed
    assert parse_recipe(raw).phases[0].block_size == 32
    del raw["phases"][0]["lr"]
    with pytest.raises(RecipeError, match=r"\[\[phases\]\] #1.*lr"):
        parse_recipe(raw, source="my-source")
