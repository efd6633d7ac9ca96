"""Training labels from the Wikimedia Commons category graph (issue #19; docs/labels.md).

`graph`: the category graph and its file format; `dump`: building it (and the file -> categories
table) from a Commons XML dump.
"""
