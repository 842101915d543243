"""Handlers of the `totobench` subcommands, one module each, imported only when their subcommand runs.

A handler takes the parsed arguments and returns the exit code. Handlers sit at the top of the
import layering (README, Architecture): they may import anything below them; nothing imports them
except `totobench.cli`.
"""
