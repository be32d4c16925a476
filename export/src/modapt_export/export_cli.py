"""``modapt export`` (owned by the export work; placeholder)."""


def configure(parser):
    def run(args):
        raise SystemExit("modapt export is not implemented yet")

    parser.set_defaults(run=run)
