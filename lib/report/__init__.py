"""Reports built from the runs' own files: uniform baselines, the demo summary, the frontier.

Every figure is read back from what a search (strategy.json, log.txt) or a fine-tune
(results.json) wrote, never from memory, so a row never mixes two policies.

    uniform.py    the uniform-precision baselines of a search's budget
    anyruns.py    the table and plots of any search and fine-tune folders
    summary.py    the demo's summary table and plots (run/run_demo.sh)
    frontier.py   the accuracy-vs-cost frontier (run/run_frontier.sh)
    plots.py      the search's figures (per-layer bits, accuracy vs cost)
    runs.py       reading a run folder's log.txt, finding the newest run, and the policy a
                  fine-tune trained

CLI: ``python -m lib.report {uniform,runs,report,frontier} ...``. This package sits above
lib/env, lib/simulator and lib/utils; nothing in those imports it.
"""
