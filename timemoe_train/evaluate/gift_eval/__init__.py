"""`timemoe-eval gift-eval`: GIFT-Eval (SalesforceAIResearch/gift-eval) as its leaderboard scores it.

The protocol's facts (configurations, terms, windows) are data_prep.gift_eval's; here, one job per file:
windows.py (a configuration's test windows and imputed histories), naive.py (statsforecast's seasonal naive),
scores.py (gluonts' eleven metrics), results.py (OUT's tables and the headline), summary.py (summary.md, .png),
job.py (the run, sharded and resumable), cli.py (the command; config.json's testdata_leakage is
evaluate/leakage.py's gift_eval_leakage).
gluonts and statsforecast come with the [gift] extra and are imported only when a run starts.
"""
