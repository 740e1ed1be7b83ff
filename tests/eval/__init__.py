"""Tests of llmasos/eval and `llmasos eval` (a package, so its module names cannot clash with other test folders)."""
