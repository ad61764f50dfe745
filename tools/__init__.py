"""Project tools: render PROGRESS.md from spec results, scaffold a learner's package."""
