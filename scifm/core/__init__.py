"""The bottom layer: contracts and helpers shared by every other package. Nothing here imports
another scifm package (docs/architecture.md, "Packages and import direction")."""
