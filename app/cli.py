"""The `qadistill` command. Each sub-command is a thin shell over a library call."""

import typer

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="Distil Q&A models and serve them.")


def main() -> None:
    """Entry point of the `qadistill` console script."""
    cli()
