"""`python -m taidon_proxy.cli`: the same as the `sqlrs` console script."""

from taidon_proxy.cli.main import main

main()
