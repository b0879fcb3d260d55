"""DeltaBank: activating a pack gives unpack's output bit for bit, and reverting gives the base back bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lifelong_delta.cli import main
from lifelong_delta.delta.bank import DeltaBank
from lifelong_delta.delta.unpack import stream_unpack
from tests.delta._checkpoints import make_pair, perturbed, read_checkpoint, save_pair, tiny_bert_pair, tiny_llama_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bert_bf16(root: Path) -> None:
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
    save_pair(BertForSequenceClassification(config).to(torch.bfloat16).eval(), root)


_PAIRS = {
    "bert": tiny_bert_pair,
    "bert-bf16": _bert_bf16,
    "llama-tied": lambda root: tiny_llama_pair(root, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def pairs(module_tmp):
    """``pairs(kind)``: the directory holding ``base`` and ``ft`` of a tiny model pair, built once per module."""
    root, made = module_tmp("bank"), set()

    def get(kind: str) -> Path:
        if kind not in made:
            _PAIRS[kind](root / kind)
            made.add(kind)
        return root / kind

    return get


def _pack(root: Path, out: str, *flags: str, finetuned: str = "ft") -> Path:
    """``root/out``, packed from ``root/base`` and ``root/finetuned`` unless an earlier test of the module did."""
    if (root / out).exists():
        return root / out
    main(
        [
            "pack",
            "--base",
            str(root / "base"),
            "--finetuned",
            str(root / finetuned),
            "--out",
            str(root / out),
            "--progress",
            "false",
            *flags,
        ]
    )
    return root / out


def _unpacked_dir(root: Path, pack: Path) -> Path:
    out = pack.with_suffix(".unpacked")
    if not out.exists():
        stream_unpack(root / "base", pack, out, progress=False)
    return out


def _unpacked(root: Path, pack: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(_unpacked_dir(root, pack))


def _model(directory: Path) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(directory, dtype=config.dtype).eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _differing(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> list[str]:
    state = model.state_dict()
    return [k for k, v in expected.items() if not torch.equal(_bits(state[k]), _bits(v))]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("kind", "flags"),
    [
        ("bert", ("--method", "dare", "--p", "0.9")),
        ("bert", ("--method", "darex-q", "--p", "0.9", "--q", "0.5")),
        ("bert", ("--method", "magnitude", "--p", "0.9")),
        ("bert", ("--method", "structural", "--p", "0.5", "--structural_axis", "rows")),
        ("bert", ("--method", "structural", "--p", "0.5", "--structural_axis", "columns")),
        ("bert-bf16", ("--method", "dare", "--p", "0.9")),
        ("bert-bf16", ("--method", "magnitude", "--p", "0.9")),
        ("llama-tied", ("--method", "dare", "--p", "0.9")),
    ],
    ids=[
        "dare",
        "darex-q",
        "magnitude",
        "structural-rows",
        "structural-columns",
        "bf16-dare",
        "bf16-magnitude",
        "llama-tied-embeddings",
    ],
)
def test_active_model_is_unpack_output_bit_for_bit(pairs, kind, flags):
    root = pairs(kind)
    name = "-".join(flags[1::2]).replace(".", "")
    pack = _pack(root, f"{name}.delta", *flags)
    model = _model(root / "base")
    original = _snapshot(model)
    bank = DeltaBank(model)
    bank.add("ft", pack)
    bank.activate("ft")
    assert bank.active == "ft"
    assert _differing(model, _unpacked(root, pack)) == []
    bank.deactivate()
    assert bank.active is None
    assert _differing(model, original) == []


@pytest.fixture(params=["store_at", "scatter"])
def switch_path(request):
    """Each test runs with the one-call switch of the compiled kernel and with torch's scatter per tensor."""
    from lifelong_delta.delta import _kernels

    if request.param == "store_at" and not _kernels.use_words():
        pytest.skip("the compiled kernel is not built")
    _kernels.set_backend("auto" if request.param == "store_at" else "torch")
    yield request.param
    _kernels.set_backend("auto")


def test_base_is_bit_identical_after_1000_switches(pairs, switch_path):
    root = pairs("bert")
    packs = {
        "dare": _pack(root, "s-dare.delta", "--method", "dare", "--p", "0.9", "--exclude", "classifier.*"),
        "darex-q": _pack(root, "s-darex.delta", "--method", "darex-q", "--p", "0.9", "--q", "0.5"),
        "magnitude": _pack(root, "s-mag.delta", "--method", "magnitude", "--p", "0.8"),
        "columns": _pack(root, "s-col.delta", "--method", "structural", "--p", "0.5", "--structural_axis", "columns"),
    }
    model = _model(root / "base")
    original = _snapshot(model)
    bank = DeltaBank(model)
    for name, pack in packs.items():
        bank.add(name, pack)
    # dare and darex-q of one seed and p keep the same entries: their positions are held once
    assert bank.nbytes() < sum(bank.nbytes(name) for name in packs)
    bank.activate("dare")
    assert (bank._packs["dare"].flat is not None) == (switch_path == "store_at")
    rng = random.Random(0)
    for _ in range(1000):
        step = rng.random()
        name = rng.choice(bank.names)
        if step < 0.1:
            bank.deactivate()
        elif step < 0.2:
            before = bank.active
            with bank.use(name):
                assert bank.active == name
            assert bank.active == before
        else:
            bank.activate(name)
    for name, pack in packs.items():
        bank.activate(name)
        assert _differing(model, _unpacked(root, pack)) == [], name
    bank.deactivate()
    assert _differing(model, original) == []


def test_use_restores_the_previous_state_on_an_exception(pairs):
    root = pairs("bert")
    pack_a = _pack(root, "u-a.delta", "--method", "dare", "--p", "0.9")
    pack_b = _pack(root, "u-b.delta", "--method", "dare", "--p", "0.9", "--seed", "1")
    model = _model(root / "base")
    original = _snapshot(model)
    bank = DeltaBank(model)
    bank.add("a", pack_a)
    bank.add("b", pack_b)
    with pytest.raises(RuntimeError, match="boom"), bank.use("a"):
        assert _differing(model, _unpacked(root, pack_a)) == []
        raise RuntimeError("boom")
    assert bank.active is None and _differing(model, original) == []
    bank.activate("b")
    with pytest.raises(RuntimeError, match="boom"), bank.use("a"):
        raise RuntimeError("boom")
    assert bank.active == "b" and _differing(model, _unpacked(root, pack_b)) == []


def test_errors_are_one_line_value_errors(pairs):
    root = pairs("bert")
    pack = _pack(root, "e.delta", "--method", "dare", "--p", "0.9")
    finetuned = _model(root / "ft")
    bank = DeltaBank(finetuned)
    with pytest.raises(ValueError, match=r"was not packed against this model: tensor '.+' has other values") as err:
        bank.add("ft", pack)
    assert "\n" not in str(err.value) and bank.names == []
    other = _model(pairs("llama-tied") / "base")
    with pytest.raises(ValueError, match="was not packed against this model: it has no tensor 'bert."):
        DeltaBank(other).add("ft", pack)

    bank = DeltaBank(_model(root / "base"))
    bank.add("ft", pack)
    with pytest.raises(ValueError, match="already has a pack named 'ft'"):
        bank.add("ft", pack)
    with pytest.raises(ValueError, match=r"no pack named 'nope' \(it has ft\)"):
        bank.activate("nope")
    with pytest.raises(ValueError, match="not a packed delta"):
        bank.add("x", root / "base")
    bank.model.double()
    with pytest.raises(ValueError, match="moved after bank.add"):
        bank.activate("ft")


def test_a_storage_reallocated_in_place_is_refused(pairs):
    """The one-call switch writes to addresses: a storage that moved under the same tensor is an error, not a
    write to freed memory (a bf16 pack on an fp32 model: its base CRC is taken on a cast, so the storage stays
    resizable)."""
    import transformers

    root = pairs("bert-bf16")
    pack = _pack(root, "realloc.delta", "--method", "dare", "--p", "0.9")
    model = transformers.BertForSequenceClassification.from_pretrained(root / "base", dtype=torch.float32).eval()
    weight = model.bert.encoder.layer[0].output.dense.weight
    weight.data = weight.data.clone()  # the loaded storage maps the file and cannot be resized
    bank = DeltaBank(model)
    bank.add("ft", pack)
    bank.activate("ft")
    bank.deactivate()
    storage = weight.untyped_storage()
    storage.resize_(storage.nbytes() + 64)  # a new allocation (the old one is copied before it is freed)
    with pytest.raises(ValueError, match="storage was reallocated"):
        bank.activate("ft")


def test_add_while_active_checks_the_base_and_keeps_the_active_pack(pairs):
    root = pairs("bert")
    pack_a = _pack(root, "w-a.delta", "--method", "dare", "--p", "0.9")
    pack_b = _pack(root, "w-b.delta", "--method", "magnitude", "--p", "0.9")
    model = _model(root / "base")
    bank = DeltaBank(model)
    bank.add("a", pack_a)
    bank.activate("a")
    bank.add("b", pack_b)
    assert bank.active == "a" and _differing(model, _unpacked(root, pack_a)) == []
    bank.remove("a")
    assert bank.active is None and bank.names == ["b"]


def test_heads_travel_with_the_delta(pairs):
    """A head of the base's shape is swapped in whole; one of another label count waits in ``extra``."""
    from transformers import BertForSequenceClassification

    root = pairs("bert")
    base = _model(root / "base")
    six = BertForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 6})).eval()
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    six.load_state_dict(state, strict=False)
    with torch.no_grad():
        for param in six.parameters():
            param.add_(0.02 * torch.randn_like(param))
    six.save_pretrained(root / "ft6")
    same = _pack(root, "h-2.delta", "--method", "dare", "--p", "0.9", "--exclude", "classifier.*")
    other = _pack(root, "h-6.delta", "--method", "dare", "--p", "0.9", "--exclude", "classifier.*", finetuned="ft6")

    model = _model(root / "base")
    original = _snapshot(model)
    bank = DeltaBank(model)
    bank.add("two", same)
    bank.add("six", other)
    assert bank.extra("two") == {}
    assert {k: list(v.shape) for k, v in bank.extra("six").items()} == {
        "classifier.weight": [6, 32],
        "classifier.bias": [6],
    }
    ids = torch.tensor([[101, 2054, 2003, 102]])
    with torch.no_grad(), bank.use("two"):
        assert torch.equal(model.classifier.weight, read_checkpoint(root / "ft")["classifier.weight"])
        assert torch.equal(model(ids).logits, _model(_unpacked_dir(root, same))(ids).logits)
    with torch.no_grad(), bank.use("six"):
        assert torch.equal(model.classifier.weight, original["classifier.weight"])
        head = bank.extra("six")
        pooled = model.bert(ids).pooler_output
        logits = torch.nn.functional.linear(pooled, head["classifier.weight"], head["classifier.bias"])
        unpacked = _unpacked(root, other)
        assert all(torch.equal(t, unpacked[k]) for k, t in head.items())
        assert _differing(model, {k: t for k, t in unpacked.items() if k not in head}) == []
        torch.testing.assert_close(logits, _model(_unpacked_dir(root, other))(ids).logits)
    assert _differing(model, original) == []


def test_bf16_pack_on_its_base_loaded_in_fp32_gives_unpack_output_in_fp32(pairs):
    import transformers

    root = pairs("bert-bf16")
    pack = _pack(root, "f32.delta", "--method", "dare", "--p", "0.9")
    model = transformers.BertForSequenceClassification.from_pretrained(root / "base", dtype=torch.float32).eval()
    original = _snapshot(model)
    bank = DeltaBank(model)
    bank.add("ft", pack)
    with bank.use("ft"):
        assert _differing(model, {k: v.float() for k, v in _unpacked(root, pack).items()}) == []
    assert _differing(model, original) == []


def test_encoder_base_with_prefixed_finetune(pairs):
    """A ``BertModel`` base serves ``BertForSequenceClassification`` packs: ``bert.X`` is the model's ``X``, an
    excluded layer is swapped in whole through that prefix, and the head waits in ``extra``."""
    from transformers import BertForSequenceClassification

    root = pairs("bert")
    BertForSequenceClassification.from_pretrained(root / "base").bert.save_pretrained(root / "encoder")
    main(
        [
            "pack",
            "--base",
            str(root / "encoder"),
            "--finetuned",
            str(root / "ft"),
            "--out",
            str(root / "p.delta"),
            "--method",
            "magnitude",
            "--p",
            "0.9",
            "--exclude",
            "*encoder.layer.0.*",
            "--progress",
            "false",
        ]
    )
    model = _model(root / "encoder")
    original = _snapshot(model)
    bank = DeltaBank(model)
    bank.add("ft", root / "p.delta")
    assert set(bank.extra("ft")) == {"classifier.weight", "classifier.bias"}
    stream_unpack(root / "encoder", root / "p.delta", root / "p.unpacked", progress=False)
    unpacked = read_checkpoint(root / "p.unpacked")
    with bank.use("ft"):
        assert (
            _differing(model, {k.removeprefix("bert."): v for k, v in unpacked.items() if k.startswith("bert.")}) == []
        )
        assert all(torch.equal(v, unpacked[k]) for k, v in bank.extra("ft").items())
    assert _differing(model, original) == []


def test_a_pack_writing_both_of_two_tied_weights_is_refused(pairs, tmp_path):
    root = pairs("llama-tied")
    model = _model(root / "base")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # embed_tokens and lm_head, untied
    base, ft = make_pair(tmp_path, base_sd=state, ft_sd=perturbed(state), shard_size="10GB")
    main(
        [
            "pack",
            "--base",
            str(base),
            "--finetuned",
            str(ft),
            "--out",
            str(tmp_path / "t.delta"),
            "--p",
            "0.9",
            "--progress",
            "false",
        ]
    )
    with pytest.raises(ValueError, match="share memory in the model"):
        DeltaBank(model).add("ft", tmp_path / "t.delta")


def _rows_finetune(root: Path, name: str, rows: slice, seed: int) -> None:
    """``root/name``: the base with only the word-embedding ``rows`` and the classifier changed (as a fine-tune
    with weight decay 0 leaves the rows of tokens its text never used)."""
    model = _model(root / "base")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.bert.embeddings.word_embeddings.weight
        emb[rows] += 0.02 * torch.randn(emb[rows].shape, generator=g)
        model.classifier.weight += 0.02 * torch.randn(model.classifier.weight.shape, generator=g)
    model.save_pretrained(root / name)


def _changed(root: Path, pack: Path, model: torch.nn.Module) -> int:
    """Entries where unpack's output differs from the base in its bits."""
    state = model.state_dict()
    return sum(
        int((_bits(v) != _bits(state[k])).view(-1, v.element_size()).any(1).sum())
        for k, v in _unpacked(root, pack).items()
    )


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)], ids=["shared-positions", "own-positions"])
def test_kept_entries_where_no_pack_differs_from_the_base_are_not_written(pairs, seeds, switch_path):
    root = pairs("bert")
    for name, rows, seed in (("rows-a", slice(100, 140), 1), ("rows-b", slice(120, 180), 2)):
        if not (root / name).exists():
            _rows_finetune(root, name, rows, seed)
    packs = {
        name: _pack(root, f"{name}-{s}.delta", "--p", "0.5", "--seed", str(s), finetuned=name)
        for name, s in zip(("rows-a", "rows-b"), seeds)
    }
    model = _model(root / "base")
    original = _snapshot(model)
    changed = {name: _changed(root, pack, model) for name, pack in packs.items()}
    kept = sum(e.numel() for e in original.values() if e.is_floating_point()) // 2
    assert 0 < changed["rows-a"] < kept // 100

    bank = DeltaBank(model)
    bank.add("rows-a", packs["rows-a"])
    assert bank.write_bytes("rows-a") == 4 * changed["rows-a"]
    bank.activate("rows-a")
    bank.add("rows-b", packs["rows-b"])  # rows 140-179 of b: entries a never wrote, now written for a as well
    assert bank.active == "rows-a"
    if seeds[0] == seeds[1]:
        both = bank.write_bytes("rows-a")
        assert both == bank.write_bytes("rows-b") > 4 * max(changed.values())
    else:
        assert bank.write_bytes("rows-b") == 4 * changed["rows-b"]
    for name in ("rows-a", "rows-b", "rows-a", "rows-b"):
        bank.activate(name)
        assert _differing(model, _unpacked(root, packs[name])) == [], name
    bank.deactivate()
    assert _differing(model, original) == []
