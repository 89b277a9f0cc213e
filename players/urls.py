from django.urls import path

from players import views

app_name = "players"
urlpatterns = [
    # Profile downloads first: resolved on every download (players/middleware.py), before any other pattern.
    path("me/<str:token>/devices/<str:ref>/profile/<str:node_ref>.ovpn", views.profile_download,
         name="device_profile_download"),
    path("me/<str:token>/profile/<str:node_ref>.ovpn", views.profile_download, name="profile_download"),
    # The host's buttons (signed in; another host's object is a 404).
    path("lans/<slug:slug>/invites/", views.invite_create, name="invite_create"),
    path("invites/<int:pk>/revoke/", views.invite_revoke, name="invite_revoke"),
    path("invites/<int:pk>/qr.svg", views.invite_qr, name="invite_qr"),
    path("players/<int:pk>/revoke/", views.player_revoke, name="player_revoke"),
    path("players/<int:pk>/reissue/", views.player_reissue, name="player_reissue"),
    path("lans/<slug:slug>/lobby/", views.host_lobby, name="host_lobby"),
    path("lans/<slug:slug>/lobby/live/", views.host_lobby_fragment, name="host_lobby_fragment"),
    path("lans/<slug:slug>/lobby/stream/", views.host_lobby_stream, name="host_lobby_stream"),
    # Public links: random tokens, never primary keys. <str:token> lets a malformed token reach its own 404 page.
    path("join/<str:token>/", views.join, name="join"),
    path("me/<str:token>/", views.player_home, name="player_home"),
    path("me/<str:token>/rtt/", views.player_rtt, name="player_rtt"),
    path("me/<str:token>/server/", views.player_choose, name="player_choose"),
    path("me/<str:token>/devices/", views.player_add_device, name="player_add_device"),
    path("me/<str:token>/devices/<str:ref>/lost/", views.player_lost_device, name="player_lost_device"),
    path("me/<str:token>/lobby/", views.lobby, name="lobby"),
    path("me/<str:token>/lobby/live/", views.lobby_fragment, name="lobby_fragment"),
    path("me/<str:token>/lobby/stream/", views.lobby_stream, name="lobby_stream"),
]
