"""Fitting hpcserve to a site: the deployment file `init` writes, the checks of `check`."""
