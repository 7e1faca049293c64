"""One module per `repq` sub-command."""
