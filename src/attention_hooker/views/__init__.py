"""What people look at: head grids and overviews (plot), the interactive page (page), axis labels."""
