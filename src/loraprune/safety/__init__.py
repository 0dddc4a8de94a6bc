"""What a run can rely on when things go wrong: nothing broken is saved, nothing is lost or left behind.

* `finite`: every tensor is checked for NaN/Inf before a save (`require_finite`);
* `divergence`: a `TrainerCallback` that records the training loss of every step, stops a run whose
  loss diverges, and remembers where it first went non-finite;
* `output`: a writable probe of the output's parent at start-up, and one writer per output (a lock
  file beside it, with a stale lock taken over);
* `staging`: temporary directories beside the output that carry their owner's PID, and removal of
  those whose process is dead;
* `signals`: SIGTERM handled like Ctrl-C (`Terminated`, exit status 143);
* `checkpoints`: `--save-steps` / `--resume` for the commands that train;
* `user_errors`: the known exception types a user's input causes, as one-line messages.
"""
