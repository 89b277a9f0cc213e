from django.urls import path
from django.views.generic import RedirectView

from nodes import views

app_name = "nodes"
urlpatterns = [
    path("", RedirectView.as_view(pattern_name="nodes:lan_list"), name="home"),
    path("lans/", views.lan_list, name="lan_list"),
    path("lans/new/", views.lan_create, name="lan_create"),
    path("lans/<slug:slug>/", views.lan_detail, name="lan_detail"),
    path("lans/<slug:slug>/nodes/add/", views.node_add, name="node_add"),
    path("lans/<slug:slug>/games/", views.lan_games, name="lan_games"),
    path("lans/<slug:slug>/topology.svg", views.lan_topology_svg, name="lan_topology_svg"),
    path("nodes/<int:pk>/", views.node_detail, name="node_detail"),
    path("nodes/<int:pk>/sync/", views.node_sync, name="node_sync"),
    # The admin's sync-progress element polls this exact path (nodes/admin.py: sync_progress).
    path("nodes/<int:pk>/status.json", views.node_status, name="node_status"),
]
