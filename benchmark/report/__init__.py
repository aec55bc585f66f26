"""Report side: tables, plots and pages built from result rows only."""
