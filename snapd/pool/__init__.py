"""Warm VMM workers: a zygote that imported everything forks workers that each hold a prebuilt VM shell.

docs/snapd.md describes the processes and the worker protocol."""
