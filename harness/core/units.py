"""Units: one MiB for the whole harness.
"""




MIB = 1024 * 1024
