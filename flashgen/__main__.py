"""`python -m flashgen ...` and the `flashgen` script: the command line.

Signal handlers go in before anything heavy is imported, so a scheduler's SIGTERM at any moment of start-up is
exit 130 with nothing written (flashgen.jobs.signals), never a death by signal.
"""


def main() -> None:
    from flashgen.jobs.signals import install_startup_handlers

    install_startup_handlers()
    from flashgen.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
