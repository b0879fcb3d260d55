"""`quiet_third_party` drops Lightning's advertising tips and the pytree deprecation, and nothing else."""

from __future__ import annotations

import logging
import warnings


def test_tips_and_pytree_deprecation_are_dropped_real_messages_kept(caplog, monkeypatch):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

    from lifelong_delta.cli import quiet_third_party

    monkeypatch.delenv("LIFELONG_DELTA_VERBOSE", raising=False)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    before = list(logger.filters)  # other in-process CLI tests of this worker may have installed it already
    logger.filters[:] = [f for f in before if type(f).__name__ != "_NoTips"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        quiet_third_party()  # idempotent: one filter
        with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
            rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
            rank_zero_info("GPU available: False, used: False")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        rank_zero_warn("The 'train_dataloader' does not have many workers")
    try:
        assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
        assert [str(w.message) for w in caught] == ["The 'train_dataloader' does not have many workers"]
        assert [type(f).__name__ for f in logger.filters].count("_NoTips") == 1
    finally:
        logger.filters[:] = before
