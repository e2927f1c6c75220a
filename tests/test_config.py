"""Run config (spellm_ds/config/: run.py, preflight.py, deepspeed.py, recipe.py): strict YAML, typed
dotted overrides, every problem reported at once, the batch identity, pre-flight checks of
files/tokenizer/charset/shards (and what preflight hands the trainer), the DeepSpeed fill, the shipped
recipes and DeepSpeed JSONs, and `spellm-ds train` refusing bad input with exit code 2 before any
process group.

Shards for the pre-flight checks are written by hand with spellm_ds.data.shards (one shard of 2 samples).
Run alone: `.venv/bin/python -m pytest tests/test_config.py -q`
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from spellm_ds.config.deepspeed import DS_OWNED_KEYS, fill_ds_config
from spellm_ds.config.preflight import preflight
from spellm_ds.config.run import (
    BatchConfig,
    ConfigError,
    TrainConfig,
    config_from_dict,
    load_config,
)
from spellm_ds.errors import SpellmError
from tests.conftest import REPO_ROOT

MINIMAL = {
    "run_dir": "runs/x",
    "deepspeed": "ds_configs/zero3_cpu.json",
    "max_steps": 10,
    "model": {"path": "models/m"},
    "data": {"train": "shards/train", "seq_len": 16},
}


def _write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _problems(exc: pytest.ExceptionInfo) -> list[str]:
    assert isinstance(exc.value, ConfigError)
    return exc.value.problems


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.trainable_layers == 5 and cfg.model.k == 10 and cfg.model.charset is None
    assert (
        cfg.checkpoint.resume == "auto"
        and cfg.loss.selection == "teacher_prior"
        and cfg.loss.regularizer == "kl6"
    )
    assert cfg.checkpoint_dir == Path("runs/x/checkpoints")
    assert cfg.tensorboard_dir == Path("runs/x/tensorboard")
    assert config_from_dict(cfg.to_dict()) == cfg  # the resolved form round-trips


def test_unknown_keys_are_errors_with_suggestions(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    data["max_step"] = 3
    data["optim"] = {"lrr": 0.1}
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, data))
    assert _problems(exc) == [
        "unknown key 'max_step' (did you mean 'max_steps'?)",
        "unknown key 'optim.lrr' (did you mean 'optim.lr'?)",
    ]


def test_overrides_are_dotted_and_typed(tmp_path):
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        [
            "optim.lr=3e-4",
            "optim.betas=0.8,0.9",
            "batch.grad_accum=null",
            "batch.train=64",
            "data.skip_corrupt=true",
            "model.charset=tables/c.json",
            "checkpoint.resume=never",
            "model.dtype=bfloat16",
            "max_steps=20",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.batch.grad_accum is None and cfg.batch.train == 64
    assert cfg.data.skip_corrupt is True
    assert cfg.model.charset == "tables/c.json"
    assert cfg.checkpoint.resume == "never" and cfg.model.dtype == "bfloat16" and cfg.max_steps == 20


def test_every_problem_is_reported_at_once(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    del data["max_steps"]
    data["model"].update(k=0, dtype="fp16")
    data["data"]["seq_len"] = "long"
    data["optim"] = {"lr": -1, "betas": [0.9, 1.5]}
    data["eval"] = {"interval": 5}  # needs data.eval
    data["bogus"] = 1
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, data), ["loss.selection=best", "schedule.warmup=3", "optim=1"])
    got = _problems(exc)
    expected = [
        "override: loss.selection='best' is not one of lowest, teacher_prior",
        "override schedule.warmup=3: unknown key 'schedule.warmup' (did you mean 'schedule.warmup_steps'?)",
        "override optim=1: 'optim' is a section, set one of its keys",
        "unknown key 'bogus'",
        "missing required key 'max_steps'",
        "model.dtype='fp16' is not one of float32, bfloat16",
        "model.k must be > 0, got 0",
        "data.seq_len='long' is not an integer",
        "optim.lr must be > 0, got -1.0",
        "optim.betas must be two values in [0, 1), got [0.9, 1.5]",
    ]
    assert got == expected
    message = str(exc.value)
    assert message.startswith(f"config {tmp_path / 'run.yaml'}: {len(expected)} problem(s)")


def test_callbacks_are_module_factory_paths_and_none_by_default(tmp_path):
    assert load_config(_write(tmp_path, MINIMAL)).callbacks == []
    cfg = load_config(_write(tmp_path, MINIMAL), ["callbacks=[fault_injection:from_env, a.b:c]"])
    assert cfg.callbacks == ["fault_injection:from_env", "a.b:c"]
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, {**MINIMAL, "callbacks": ["fault_injection", ":f"]}))
    assert _problems(exc) == [
        "callbacks[0]='fault_injection' is not a module:factory import path",
        "callbacks[1]=':f' is not a module:factory import path",
    ]


def test_range_problems_of_a_complete_config_include_cross_field_checks(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    data["schedule"] = {"warmup_steps": 50, "min_lr": 1.0}
    data["eval"] = {"interval": 5}
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, data))
    assert _problems(exc) == [
        "schedule.warmup_steps=50 exceeds max_steps=10",
        "schedule.min_lr=1.0 exceeds optim.lr=0.004",
        "eval.interval > 0 needs data.eval (held-out shards); set eval.interval=0 to disable",
    ]


@pytest.mark.parametrize(
    ("micro", "accum", "train", "world", "expected"),
    [
        (2, None, None, 4, (2, 1, 8)),
        (2, None, 16, 4, (2, 2, 16)),
        (2, 3, None, 2, (2, 3, 12)),
        (2, 3, 12, 2, (2, 3, 12)),
        (1, None, 256, 32, (1, 8, 256)),
    ],
)
def test_batch_identity_resolves(micro, accum, train, world, expected):
    assert BatchConfig(micro=micro, grad_accum=accum, train=train).resolve(world) == expected


def test_batch_identity_mismatch_names_the_numbers():
    with pytest.raises(SpellmError, match=r"12 != 2 x 3 x 4 = 24"):
        BatchConfig(micro=2, grad_accum=3, train=12).resolve(4)
    with pytest.raises(SpellmError, match=r"batch.train=12 is not a positive multiple of .* = 2 x 4 = 8"):
        BatchConfig(micro=2, train=12).resolve(4)
    with pytest.raises(ConfigError, match=r"not a multiple of batch\.micro x batch\.grad_accum"):
        BatchConfig(micro=4, grad_accum=2, train=12)


# ---------------------------------------------------------------------------------------------------
# Pre-flight against real files


def _shards(out: Path, tok_hash: str, seq_len: int, vocab: int) -> Path:
    from spellm_ds.data.shards import (
        ShardEntry,
        encode_sample,
        make_index,
        sample_key,
        shard_name,
        write_shard,
    )

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    members = []
    for i in range(2):
        ids = rng.integers(0, vocab, size=seq_len)
        top = rng.integers(0, vocab, size=(seq_len, 5))
        lps = np.sort(-rng.random((seq_len, 5)) * 5, axis=1)[:, ::-1]
        members.append((sample_key(i), encode_sample(ids, top, lps, vocab)))
    size, sha = write_shard(out / shard_name(0), members)
    entry = ShardEntry(shard_name(0), 0, 2, 2 * seq_len, size, sha, 0)
    index = make_index(
        teacher={"path": "hand-made"},
        tokenizer_hash=tok_hash,
        vocab_size=vocab,
        eos_id=0,
        seq_len=seq_len,
        top_k=5,
        samples_per_shard=2,
        build_args={},
        entries=[entry],
    )
    (out / "index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def model_hash(tiny_llama) -> str:
    from transformers import AutoTokenizer

    from spellm_ds.fingerprint import tokenizer_hash

    return tokenizer_hash(AutoTokenizer.from_pretrained(str(tiny_llama)))


def test_preflight_accepts_a_consistent_setup(tmp_path, tiny_llama, model_hash):
    from spellm_ds.charset import CharTable

    train = _shards(tmp_path / "train", model_hash, 16, 2048)
    table = CharTable.build(str(tiny_llama), k=10)
    table.save(tmp_path / "charset.json")
    cfg = config_from_dict(
        {
            **MINIMAL,
            "deepspeed": str(REPO_ROOT / "ds_configs" / "zero3_cpu.json"),
            "model": {
                "path": str(tiny_llama),
                "trainable_layers": 6,
                "charset": str(tmp_path / "charset.json"),
            },
            "data": {"train": str(train), "eval": str(train), "seq_len": 16},
            "batch": {"micro": 2, "train": 8},
        }
    )
    pre = preflight(cfg, world_size=2)
    assert (pre.micro, pre.grad_accum, pre.train_batch) == (2, 2, 8)
    assert pre.num_layers == 6 and pre.tokenizer_hash == model_hash
    assert pre.train_index["totals"]["samples"] == 2
    filled = fill_ds_config(pre.ds_config, cfg, pre)
    assert filled["train_batch_size"] == 8 and filled["gradient_accumulation_steps"] == 2
    assert filled["train_micro_batch_size_per_gpu"] == 2 and filled["optimizer"]["params"]["lr"] == 4e-3
    assert filled["optimizer"]["params"]["torch_adam"] is True  # kept from the JSON
    assert filled["bf16"]["enabled"] is False and filled["gradient_clipping"] == 1.0
    assert set(DS_OWNED_KEYS) >= {"train_batch_size", "optimizer.params.lr"}
    cfg.model.dtype = "bfloat16"
    assert fill_ds_config(pre.ds_config, cfg, pre)["bf16"]["enabled"] is True
    # what the checks read is handed over, so the trainer reads none of it again
    from spellm_ds.fingerprint import tokenizer_hash

    assert tokenizer_hash(pre.tokenizer) == model_hash
    assert pre.hf_config.num_hidden_layers == 6 and pre.hf_config.vocab_size > 0
    assert pre.table is not None and pre.table.hash == table.hash


def test_preflight_reports_every_input_problem_at_once(tmp_path, tiny_llama, metaspace_tokenizer, model_hash):
    from spellm_ds.charset import CharTable

    wrong_len = _shards(tmp_path / "train", model_hash, 8, 2048)
    other_tok = _shards(tmp_path / "eval", "0" * 64, 16, 2048)
    CharTable.build(str(metaspace_tokenizer), k=10).save(tmp_path / "other_charset.json")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    ds["train_batch_size"] = "auto"
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = config_from_dict(
        {
            **MINIMAL,
            "deepspeed": str(tmp_path / "ds.json"),
            "model": {
                "path": str(tiny_llama),
                "trainable_layers": 7,
                "charset": str(tmp_path / "other_charset.json"),
            },
            "data": {"train": str(wrong_len), "eval": str(other_tok), "seq_len": 16},
            "batch": {"micro": 2, "grad_accum": 1, "train": 8},
            "checkpoint": {"resume": str(tmp_path / "no_such_checkpoint")},
        }
    )
    with pytest.raises(ConfigError) as exc:
        preflight(cfg, world_size=3)
    got = "\n".join(_problems(exc))
    assert len(_problems(exc)) == 7, got
    for needle in (
        "model.trainable_layers=7 is larger than the model's 6 decoder layers",
        "other_charset.json was built for another tokenizer",
        "data.train: shards in",
        "have seq_len 8, config data.seq_len is 16",
        "data.eval: shards in",
        "were built with another tokenizer",
        'uses "auto" at train_batch_size',
        "8 != 2 x 1 x 3 = 6",
        "checkpoint.resume:",
    ):
        assert needle in got, needle


def test_preflight_missing_files(tmp_path):
    cfg = config_from_dict(
        {**MINIMAL, "run_dir": str(tmp_path / "r"), "model": {"path": str(tmp_path / "m")}}
    )
    cfg.deepspeed = str(tmp_path / "none.json")
    cfg.data.train = str(tmp_path / "shards")
    cfg.model.charset = str(tmp_path / "c.json")
    with pytest.raises(ConfigError) as exc:
        preflight(cfg, world_size=1)
    assert [p.split(":")[0] for p in _problems(exc)] == [
        "model.path",
        "model.charset",
        "data.train",
        "deepspeed",
    ]


def test_cli_refuses_bad_input_with_exit_2_before_any_process_group(tmp_path):
    data = {
        **MINIMAL,
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(tmp_path / "nope")},
        "extra": 1,
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spellm_ds.cli",
            "train",
            "--config",
            str(_write(tmp_path, data)),
            "optim.lr=x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "spellm-ds train: error: config" in proc.stderr
    assert "unknown key 'extra'" in proc.stderr and "optim.lr='x' is not a number" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_exit_without_teardown_keeps_the_code_and_flushes_output():
    """What `train` ends with under the CLI: unflushed stdout, stderr and a log line all arrive."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stderr, format='%(message)s', level=logging.INFO)\n"
        "from spellm_ds.dist import exit_without_teardown\n"
        "print('out-unterminated', end='')\n"
        "sys.stderr.write('err-unterminated')\n"
        "logging.getLogger('x').info('log-line')\n"
        "exit_without_teardown(7)\n"
        "print('never')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert proc.returncode == 7
    assert proc.stdout == "out-unterminated"
    assert "err-unterminated" in proc.stderr and "log-line" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# Shipped recipes and DeepSpeed configs


@pytest.mark.parametrize(
    ("name", "world", "accum"), [("tiny_cpu", 2, 1), ("llama3_8b", 8, 2), ("llama3_70b", 32, 8)]
)
def test_shipped_recipes_load_and_open_with_their_command(name, world, accum):
    path = REPO_ROOT / "configs" / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    opening = text.split("\n\n")[0]
    assert opening.startswith("#") and f"--config configs/{name}.yaml" in opening
    cfg = load_config(path)
    assert cfg.batch.resolve(world)[1] == accum
    assert (REPO_ROOT / cfg.deepspeed).is_file()


# The measured recipe, written out here as the demo's measurements chose it (examples/README.md's table):
# the teacher-prior rule at tau 10, kl6 at weight 5, heads and MLPs at one rate of 4e-3, and a warm
# start of the heads on 32K positions with 60 L-BFGS iterations at L2 1e-4.
MEASURED = {
    "loss.selection": "teacher_prior",
    "loss.tau": 10.0,
    "loss.regularizer": "kl6",
    "loss.reg_weight": 5.0,
    "warm_start.positions": 32768,
    "warm_start.iters": 60,
    "warm_start.l2": 1e-4,
    "optim.lr": 4e-3,
    "optim.mlp_lr_scale": 1.0,
}


def test_run_config_defaults_are_the_measured_recipe(tmp_path):
    from spellm_ds.config.recipe import RECIPE_POLICY, recipe_deviations

    assert RECIPE_POLICY == MEASURED
    assert recipe_deviations(load_config(_write(tmp_path, MINIMAL))) == {}
    changed = load_config(_write(tmp_path, MINIMAL), ["loss.tau=3", "warm_start.positions=0"])
    assert recipe_deviations(changed) == {"loss.tau": (3.0, 10.0), "warm_start.positions": (0, 32768)}


def _line_comment(text: str, key: str) -> str:
    """The comment on the YAML line of dotted `key` (section then field), '' when none."""
    section, name = key.split(".")
    in_section = False
    for line in text.splitlines():
        if not line.startswith(" "):
            in_section = line.split("#")[0].strip() == f"{section}:"
        elif in_section and line.strip().startswith(f"{name}:"):
            return line.split("#", 1)[1].strip() if "#" in line else ""
    return ""


@pytest.mark.parametrize("name", ["tiny_cpu", "demo_cpu", "llama3_8b", "llama3_70b"])
def test_shipped_recipes_follow_the_measured_policy(name):
    from spellm_ds.config.recipe import recipe_deviations

    path = REPO_ROOT / "configs" / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    cfg = load_config(path)
    for key, (value, want) in recipe_deviations(cfg).items():
        comment = _line_comment(text, key)
        assert comment.startswith("scale:") and len(comment) > len("scale: ") + 20, (
            f"{path.name}: {key}={value} deviates from the measured {want} without a `# scale:` reason"
        )


def test_line_comment_finds_the_field_of_its_own_section():
    text = "optim:\n  lr: 0.1   # scale: a reason\nloss:\n  lr: 3\n"
    assert _line_comment(text, "optim.lr") == "scale: a reason"
    assert _line_comment(text, "loss.lr") == ""
    assert _line_comment(text, "warm_start.lr") == ""


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}")
    else:
        yield path, obj


@pytest.mark.parametrize("name", ["zero3_cpu", "zero3_gpu_single_node", "zero3_70b_multinode"])
def test_deepspeed_configs_are_concrete_zero3_with_an_identity_that_holds(name):
    ds = json.loads((REPO_ROOT / "ds_configs" / f"{name}.json").read_text())
    assert all(v != "auto" for _, v in _leaves(ds))
    assert ds["zero_optimization"]["stage"] == 3 and "scheduler" not in ds
    assert ds["optimizer"]["params"]["torch_adam"] is True
    micro, accum, total = (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    )
    assert total % (micro * accum) == 0
    if name == "zero3_70b_multinode":
        assert ds["zero_optimization"]["zero_hpz_partition_size"] == 8
        assert ds["bf16"]["enabled"] is True
