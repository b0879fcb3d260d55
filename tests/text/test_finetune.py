"""One tiny real fine-tune of MiniLM end to end (AdamR), the cache contract, LoRA export and the LR
schedule."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lifelong_delta.text.finetune import RECIPES, finetune, finetune_dir
from lifelong_delta.text.module import SequenceClassifier, linear_warmup_decay, param_groups

TINY = dict(epochs=1, max_train_examples=24, max_eval_examples=16, max_length=16, batch_size=8, progress=False)


class _Bar:
    """Stands in for the outer ``Progress`` of ``all_finetunes``."""

    def __init__(self):
        self.details = []

    def update(self, advance=1, *, detail=None):
        self.details.append(detail)


BAR = _Bar()


@pytest.fixture(scope="module")
def tiny(module_tmp):
    from lifelong_delta.text.finetune import _steps_in_detail

    cache = module_tmp("finetunes")
    path = finetune(
        "trec", "adamr-l2", cache_dir=str(cache), callbacks=[_steps_in_detail(BAR, "trec/adamr-l2")], **TINY
    )
    return cache, path


def test_the_outer_bar_shows_the_training_steps(tiny):
    assert BAR.details == ["trec/adamr-l2 step 1/3", "trec/adamr-l2 step 3/3"]  # 24 examples, batch 8


def test_tiny_finetune_writes_a_loadable_hf_directory(tiny):
    from transformers import AutoModelForSequenceClassification

    cache, path = tiny
    assert path == str(finetune_dir("trec", "adamr-l2", cache))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "finetune.json"):
        assert os.path.isfile(os.path.join(path, f)), f
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    assert model.config.num_labels == 6 and model.config.id2label[0] == "ABBR"
    info = json.loads(open(os.path.join(path, "finetune.json")).read())
    assert info["recipe"] == "adamr-l2" and info["hparams"]["reg"] == RECIPES["adamr-l2"].reg
    assert info["hparams"]["optimizer"] == "adamr" and info["steps"] == 3
    assert info["n_examples"] == {"train": 24, "val": 16, "test": 16}
    assert 0 <= info["val_acc"] <= 1 and 0 <= info["test_acc"] <= 1 and info["wall_time_s"] > 0
    assert not [p for p in os.listdir(cache / "trec") if p.startswith(".")]  # no temporary directories left


def test_base_and_finetune_hold_the_same_tensors_and_the_training_moved_them(tiny):
    cache, path = tiny
    base = load_file(str(finetune_dir("trec", "base", cache) / "model.safetensors"))
    ft = load_file(os.path.join(path, "model.safetensors"))
    assert base.keys() == ft.keys()
    assert all(base[k].shape == ft[k].shape and base[k].dtype == ft[k].dtype for k in base)
    assert {"classifier.weight", "classifier.bias"} <= base.keys()
    assert not torch.equal(base["classifier.weight"], ft["classifier.weight"])
    assert not torch.equal(
        base["bert.encoder.layer.0.attention.self.query.weight"],
        ft["bert.encoder.layer.0.attention.self.query.weight"],
    )
    info = json.loads(open(os.path.join(path, "finetune.json")).read())
    delta = sum(float((ft[k] - base[k]).abs().sum()) for k in base if not k.startswith("classifier."))
    n = sum(base[k].numel() for k in base if not k.startswith("classifier."))
    assert info["delta_abs_mean"] == pytest.approx(delta / n, rel=1e-3)


def test_cached_finetune_is_reused_and_other_hparams_are_refused(tiny, capsys):
    cache, path = tiny
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert finetune("trec", "adamr-l2", cache_dir=str(cache), **TINY) == path
    assert "cached" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    with pytest.raises(ValueError, match="epochs=1 .*force=True"):
        finetune("trec", "adamr-l2", cache_dir=str(cache), **{**TINY, "epochs": 2})


def test_a_finished_finetune_leaves_no_model_behind(tiny):
    """Lightning's trainer and the module refer to each other; with the automatic collector off, only ``finetune``'s
    own collection frees them. Without it a loop of fine-tunes kept every model and optimiser state (RSS grew by one
    model per fine-tune)."""
    import gc

    cache, _ = tiny
    gc.collect()
    gc.disable()
    try:
        finetune("trec", "adamw", cache_dir=str(cache), **TINY)
        alive = [o for o in gc.get_objects() if isinstance(o, SequenceClassifier)]
    finally:
        gc.enable()
    assert alive == []


def test_bad_task_or_recipe_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="recipe must be one of"):
        finetune("trec", "sgd", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="task must be one of"):
        finetune("cola", "adamw", cache_dir=str(tmp_path))
    assert not os.listdir(tmp_path)


def test_lora_export_is_the_merged_model_plus_a_peft_adapter(tiny, tmp_path):
    cache, _ = tiny
    base_dir = finetune_dir("trec", "base", cache)
    module = SequenceClassifier(model_dir=str(base_dir), lora_r=2, lora_alpha=4)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert not any("attention.self.key" in n or "intermediate" in n for n in trainable)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.01)
    module.save_pretrained(tmp_path)
    base = load_file(str(base_dir / "model.safetensors"))
    merged = load_file(str(tmp_path / "model.safetensors"))
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert merged.keys() == base.keys()
    key = "bert.encoder.layer.1.attention.self.value"
    a, b = (adapter[f"base_model.model.{key}.lora_{x}.weight"] for x in "AB")
    torch.testing.assert_close(merged[f"{key}.weight"] - base[f"{key}.weight"], (4 / 2) * b @ a, atol=1e-6, rtol=0)
    assert torch.equal(
        merged["bert.encoder.layer.1.attention.self.key.weight"],
        base["bert.encoder.layer.1.attention.self.key.weight"],
    )
    assert torch.equal(merged["classifier.weight"], adapter["base_model.model.classifier.weight"])


def test_adamr_leaves_the_head_unregularized(tiny):
    from lifelong_delta.optim import AdamR

    cache, _ = tiny
    module = SequenceClassifier(model_dir=str(finetune_dir("trec", "base", cache)))
    groups = param_groups(module.model, module.unregularized)
    assert len(groups) == 2 and groups[1]["reg"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {
        id(module.model.classifier.weight),
        id(module.model.classifier.bias),
    }
    opt = AdamR(groups, lr=1e-3, reg=0.5)
    assert [g["reg"] for g in opt.param_groups] == [0.5, 0.0]
    assert module.model.training  # dropout is on while fine-tuning


def test_linear_warmup_decay():
    factors = [linear_warmup_decay(s, total_steps=10, warmup_steps=2) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2:] == pytest.approx([1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert linear_warmup_decay(0, total_steps=5, warmup_steps=0) == 1.0


def test_adamr_is_chosen_from_the_lightning_yaml_config(tmp_path):
    """configs/finetune_trec.yaml picks AdamR like any torch optimiser; it is anchored at the pretrained weights
    (the classifier head in its own reg=0 group) and one ``lightning fit`` step runs."""
    from pathlib import Path

    from lightning.pytorch.cli import LightningCLI

    from lifelong_delta.optim import AdamR

    config = Path(__file__).resolve().parents[2] / "configs" / "finetune_trec.yaml"
    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=[
            "-c",
            str(config),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.init_args.max_train_examples=24",
            "--data.init_args.max_eval_examples=12",
            "--data.init_args.batch_size=8",
        ],
        run=False,
        auto_configure_optimizers=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, AdamR)
    assert [(g["reg"], g["variant"]) for g in opt.param_groups] == [(0.1, "l2"), (0.0, "l2")]
    assert opt.param_groups[0]["lr"] <= 5e-5  # the warm-up/decay schedule drives the configured lr
    head = {id(p) for n, p in cli.model.model.named_parameters() if n.startswith("classifier.")}
    assert {id(p) for p in opt.param_groups[1]["params"]} == head
    moved = [not torch.equal(p, opt.pretrained[p]) for p in opt.param_groups[0]["params"] if p.grad is not None]
    assert moved and any(moved)  # the step trained the encoder away from its anchor


def test_finetune_json_records_the_thread_count(tiny):
    """A fine-tune's weights depend on torch's thread count (CPU reductions), so it is recorded with them."""
    cache, _path = tiny
    info = json.loads((finetune_dir("trec", "adamr-l2", cache) / "finetune.json").read_text())
    assert info["torch_threads"] == torch.get_num_threads() >= 1
