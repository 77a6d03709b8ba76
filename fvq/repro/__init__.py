"""The reproduction suite: the paper's claims as experiment files, one evaluation protocol, committed results.

* :mod:`fvq.repro.experiments`: the experiment files under ``experiments/`` and the training config of each run.
* :mod:`fvq.repro.protocol`: the evaluation every run gets (held-out usage with enough tokens per code, its curve,
  perplexity, dead codes, restarted codes, PSNR, LPIPS, wall time).
* :mod:`fvq.repro.runner`: train (resumably), evaluate, write ``results/<experiment>/<run>.json``.
* :mod:`fvq.repro.summarize`: tables and figures of ``docs/results.md`` from the committed summaries.

The face is ``fvq repro list | run | summarize`` (:mod:`fvq.commands.repro`).
"""
