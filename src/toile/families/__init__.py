"""Model families: one module each, all implementing ``toile.families.base.Family``."""
