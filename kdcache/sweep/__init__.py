"""Many students from one cache: `kdcache sweep` trains them, `kdcache report` compares them.

The sweep drives `kdcache train-student` in subprocesses (one per GPU when several are visible), so
a crash or out-of-memory in one student never takes the others down, and each run folder is a plain
train-student output that resumes with `--resume`.
"""
