import sys

# The host suite runs in launch-only mode, which is read when fura_kernels is imported: it is
# dispatched before anything imports the package.
if sys.argv[1:2] == ["host"]:
    from .host import main

    main(sys.argv[2:])
else:
    from .cli import main

    main()
