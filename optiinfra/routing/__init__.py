"""Tasks: customer requests routed to a healthy agent able to do them."""
