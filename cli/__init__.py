"""The `fedsight` console command. Subcommands import their packages lazily (fast --help)."""
