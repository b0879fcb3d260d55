"""``ProgressLines``: lines of a tiny ``Trainer.fit`` / ``validate`` / ``test`` on a stream that is not a terminal,
throttled by a fake clock; nothing on a terminal."""

from __future__ import annotations

import io
import re

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lifelong_delta.callbacks import ProgressLines

LINE = re.compile(r"^(fit|validate|test): \d+(/\d+)? (steps|batches)( \(\d+%\))?, .*(elapsed|done in|stopped after)")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tiny(pl.LightningModule):
    """A linear regression on random tensors; each training step moves ``clock`` by ``seconds_per_step``."""

    def __init__(self, clock: Clock | None = None, seconds_per_step: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.clock, self.seconds_per_step = clock, seconds_per_step

    def training_step(self, batch, batch_idx):
        if self.clock is not None:
            self.clock.now += self.seconds_per_step
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 12) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randn(n, 1)), batch_size=4)


def _trainer(callback: ProgressLines, **kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(callbacks=[callback], **{**defaults, **kwargs})


def test_fit_prints_steps_epoch_loss_and_time_left():
    out = io.StringIO()
    _trainer(ProgressLines(interval=0, stream=out), max_epochs=2).fit(Tiny(), _loader())
    lines = out.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert lines[0].startswith("fit: 0/6 steps (0%), 0 s elapsed — epoch 1/2")
    assert re.fullmatch(
        r"fit: 1/6 steps \(16%\), \d+ s elapsed, about \d+ s left — epoch 1/2, loss \d\.\d+", lines[1]
    ), lines[1]
    assert any(line.startswith("fit: 4/6 steps (66%)") and "epoch 2/2" in line for line in lines)
    assert re.fullmatch(r"fit: 6/6 steps \(100%\), done in \d+ s — epoch 2/2, loss \d\.\d+", lines[-1]), lines[-1]


def test_lines_at_most_every_interval_of_the_fake_clock():
    clock, out = Clock(), io.StringIO()
    model = Tiny(clock, seconds_per_step=4.0)  # 9 steps of 4 s, a line at most every 10 s
    _trainer(ProgressLines(interval=10, stream=out, clock=clock), max_epochs=3).fit(model, _loader())
    lines = out.getvalue().splitlines()
    assert lines == [
        "fit: 0/9 steps (0%), 0 s elapsed — epoch 1/3",
        f"fit: 3/9 steps (33%), 12 s elapsed, about 24 s left — epoch 1/3, loss {_loss(lines[1])}",
        f"fit: 6/9 steps (66%), 24 s elapsed, about 12 s left — epoch 2/3, loss {_loss(lines[2])}",
        f"fit: 9/9 steps (100%), 36 s elapsed, about 0 s left — epoch 3/3, loss {_loss(lines[3])}",
        f"fit: 9/9 steps (100%), done in 36 s — epoch 3/3, loss {_loss(lines[4])}",
    ]


def _loss(line: str) -> str:
    return line.rsplit("loss ", 1)[1]


def test_max_steps_bounds_the_epochs_and_validation_shows_in_the_detail():
    out = io.StringIO()
    trainer = _trainer(ProgressLines(interval=0, stream=out), max_steps=5, max_epochs=-1)
    trainer.fit(Tiny(), _loader(), _loader(8))
    lines = out.getvalue().splitlines()
    assert lines[0] == "fit: 0/5 steps (0%), 0 s elapsed — epoch 1/2"
    assert any(line.endswith("— epoch 1/2, validating batch 2/2") for line in lines), lines
    assert lines[-1].startswith("fit: 5/5 steps (100%), done in ")


def test_validate_and_test_count_batches():
    out = io.StringIO()
    trainer = _trainer(ProgressLines(interval=0, stream=out))
    trainer.validate(Tiny(), _loader(12), verbose=False)
    trainer.test(Tiny(), [_loader(8), _loader(4)], verbose=False)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("validate: 1/3 batches (33%), 0 s elapsed")
    assert lines[3].startswith("validate: 3/3 batches (100%), done in ")
    assert lines[4].startswith("test: 1/3 batches (33%), ") and lines[4].endswith("— dataloader 1/2")
    assert lines[6].endswith("— dataloader 2/2") and lines[-1].startswith("test: 3/3 batches (100%), done in ")


def test_an_error_ends_with_a_stopped_line():
    class Failing(Tiny):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    out = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(ProgressLines(interval=0, stream=out), max_epochs=1).fit(Failing(), _loader())
    assert re.match(r"fit: 2/3 steps \(66%\), stopped after \d+ s — epoch 1/1, loss", out.getvalue().splitlines()[-1])


def test_a_terminal_gets_nothing():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    trainer = _trainer(ProgressLines(interval=0, stream=out), max_epochs=1)
    trainer.fit(Tiny(), _loader())
    trainer.validate(Tiny(), _loader(), verbose=False)
    assert out.getvalue() == ""


def test_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        ProgressLines(interval=-1)
