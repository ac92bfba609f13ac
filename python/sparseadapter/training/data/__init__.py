"""Reading labelled text, one module per source: tables (your CSV/TSV/JSON-lines files) with
task_inference (the task they define), glue (GLUE TSVs and the hub), bbc (the embedded corpus) and
generation_tables (source/target files). Every reader returns a list of `example.Example` and raises
`example.DataError` naming the file, the 1-based line and what is wrong, so a broken row in a 60k-line
file is found without a debugger; files holds the file formats they share, labels the label conversion.
The package's public readers are importable from `sparseadapter.training`."""
