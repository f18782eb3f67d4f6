"""Pure transformations of DataFrames: Expensify reports to expense lines, lines to journal drafts."""
