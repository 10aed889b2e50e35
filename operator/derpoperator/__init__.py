"""derpfleet's control plane: DerpRegion resources reconciled into relay fleets."""
