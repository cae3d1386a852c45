"""Export recipes are data: one TOML file per recipe in this folder (read by ``exporter.recipes``)."""
