"""``modapt merge`` (owned by the merge work; placeholder)."""


def configure(parser):
    def run(args):
        raise SystemExit("modapt merge is not implemented yet")

    parser.set_defaults(run=run)
