"""What the plugin adds to RecBole's data pipeline."""
