"""On-policy rounds (`dpo iterate`): sample from the policy, label, pair, train DPO on the pairs, repeat.

plan.py     where each round lives and the config each of its stages runs with (pure: no Ray)
checks.py   check_rounds: what `dpo iterate` refuses before Ray starts, naming the key
loop.py     the loop: the prompt set once, then per round generate -> label -> tokenize -> score ->
            train -> evaluate under <run_dir>/rounds/<t>/, each a cached, resumable stage
report.py   the evaluation across rounds: a per-round table, one reward-vs-KL point per round, trackers
"""
