"""Monthly supplier emission statements: figures from the rollups, signed versions, PDF/CSV/JSON, delivery."""
