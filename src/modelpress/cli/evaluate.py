"""(placeholder) evaluate subcommand."""


def add_arguments(parser):
    pass


def main(args):
    raise NotImplementedError
