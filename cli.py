"""moa-search command line (placeholder until the CLI lands)."""


def main() -> None:
    print("moa-search")
