"""What the coordinator, the sites and the simulation share of Flower: the SAFN app bundle
(`fab`: its source and sha256, which a site approves) and every patch of Flower's private
internals (`patches`: checked before they are applied). `safn_core` never imports Flower; this
package is the one place, besides the thin apps in `server/` and `client/`, that reaches into it.
"""
