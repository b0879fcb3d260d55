"""Studies: recipes that compose the library's components into one experiment and its report.

A study imports the library (``delta``, ``optim``, ``text``, ...); nothing in the library imports a study, and no
study imports ``lifelong_delta.cli`` (which lists them as subcommands).

* :mod:`lifelong_delta.studies.prune_eval`: ``make prune-eval``, delta pruning of the cached MiniLM / MPNet
  fine-tunes of :mod:`lifelong_delta.text` (TREC, VADER), every method at every p, scored by test accuracy; with
  ``prune_eval_plan`` (the cells and fine-tunes), ``prune_eval_data`` (splits), ``prune_eval_masks`` (masked
  deltas), ``prune_eval_run`` (one fine-tune's cells) and ``prune_eval_report`` (CSV, summary, plot).
* :mod:`lifelong_delta.studies.prune_eval_decoder`: ``make prune-eval-decoder``, delta pruning of a small Llama
  pretrained and fine-tuned offline (DARE the Extreme, arXiv 2410.09344).
* :mod:`lifelong_delta.studies.cl_eval`: ``make cl-eval``, every continual-learning method of
  ``configs/cl_eval/<stream>/`` over several seeds (Smith et al., arXiv 2203.17269).
* :mod:`lifelong_delta.studies.merge_eval`: ``make merge-eval``, the TREC and VADER MiniLM fine-tunes merged by every
  ``lifelong-delta merge`` method, each task scored with its own head.
"""
