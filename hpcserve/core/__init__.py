"""hpcserve's pure core: the pool's data and every decision about it, with no I/O.

    jobs.py        Job, JobState: Slurm jobs as hpcserve reasons about them
    pool.py        Desired (what the user asked for), Replica (one job and its llama-server),
                   Health, Server (HAProxy's membership entry), server names
    plan.py        plan(): desired + observed -> submit, cancel, drain, membership; effective_renew_before()
    autoscale.py   decide(): load signals + policy + memory -> desired replicas
    membership.py  the runtime commands of a membership change, slot sharing between workers

Everything outside this package talks to an outside system (Slurm, HAProxy, llama-server,
OpenWebUI, files) and calls in here to decide. The core imports only the standard library and
itself (tests/unit/test_core.py enforces it; mypy --strict checks it in scripts/test.sh), so each
rule can be tested with plain data.
"""
