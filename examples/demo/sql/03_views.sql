CREATE VIEW film_popularity AS
SELECT f.film_id, f.title, count(r.rental_id) AS rentals
FROM film f LEFT JOIN rental r USING (film_id)
GROUP BY f.film_id, f.title;
