"""The pool's control loop: one reconcile step, autoscaling runs, what `status` reports."""
