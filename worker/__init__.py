"""The streaming forecasting service around the attnlstm model library."""
