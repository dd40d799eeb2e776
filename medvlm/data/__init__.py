"""medvlm.data: inputs: question CSVs, images, public label files, expert regions."""
