"""Small-scale reproductions of the Mamba-3 paper's claims, one command each (docs/results.md).

    hybridlm study state-tracking | out-norm | discretization [--quick] [--dry-run] [--probe N]

``driver`` plans and runs a study, ``runner`` runs one model through the project's own commands
(train, export, eval), ``results`` keeps ``results.json`` (resumable), ``config`` reads
``specs/studies/<study>/study.toml``; one module per study defines its runs and its summary;
``corpus`` builds study 3's text from the Python standard library.
"""
